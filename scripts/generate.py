"""Prints what a trained model answers to prompts.

  python scripts/generate.py --run runs/smollm2_lora --prompt "What is federated learning?"
  python scripts/generate.py --run runs/smollm2_lora --compare --prompt "Name three colors."
  python scripts/generate.py --model models/smollm2-135m-instruct --prompt "Hi!"
  python scripts/generate.py --run runs/default --prompt "copy: abc" --prompt "max: 3 9 4"

With ``--run`` the run's base model (pretrained directory or its seeded random init) is loaded
with the global trainable params of the run's newest checkpoint: LoRA factors, soft prompt,
prefix or all parameters. ``--compare`` also prints the base model's answer without them. With
``--model`` a local Hugging Face-format directory is used as is. Prompts go through the
tokenizer's chat template as a user turn when it has one (``--raw`` sends them as plain text);
decoding is greedy unless ``--temperature`` > 0 (with ``--top-p`` nucleus sampling).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.cli import ScriptContext, exit_process, run_script
from fedjax_llm.config import ConfigError
from fedjax_llm.data import load_tokenizer
from fedjax_llm.errors import UserError
from fedjax_llm.models.generation import generate
from fedjax_llm.models.hf_loader import load_hf_config, load_pretrained
from fedjax_llm.simulation import load_trained


def encode_prompt(tokenizer, prompt: str, raw: bool) -> list[int]:
    """Token ids of one prompt: a chat user turn plus the assistant header, or plain text."""
    if not raw and getattr(tokenizer, "has_chat_template", False):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    return tokenizer.encode(prompt, add_bos=True)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into a [B, W] batch and its mask."""
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = True
    return tokens, mask


def answer(model_config, params, model_kwargs, tokenizer, prompts, args) -> list[str]:
    """Generates an answer for every prompt, in one batch."""
    rows = [encode_prompt(tokenizer, p, args.raw) for p in prompts]
    tokens, mask = left_pad(rows, tokenizer.pad_id)
    out = generate(
        model_config,
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        max_new_tokens=args.max_new_tokens,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        model_kwargs=model_kwargs,
        key=jax.random.key(args.seed),
        temperature=args.temperature,
        top_p=args.top_p,
    )
    return [tokenizer.decode(row.tolist()) for row in np.asarray(out)]


def _generate(argv: list[str] | None, context: ScriptContext) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (config.yaml + checkpoints/)")
    source.add_argument("--model", help="a local Hugging Face-format model directory")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="with --model (default: its context)"
    )
    parser.add_argument("--compare", action="store_true", help="also show the base's answer")
    parser.add_argument("--raw", action="store_true", help="no chat template")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.temperature < 0 or not 0.0 < args.top_p <= 1.0:
        parser.error("--temperature must be >= 0 and --top-p in (0, 1]")

    try:
        if args.run:
            trained = load_trained(args.run)
            tokenizer, model_config = trained.tokenizer, trained.model_config
            params, model_kwargs = trained.trainable.model_inputs(trained.frozen, trained.params)
            label = f"{args.run} ({trained.config.trainable.mode}, round {trained.round})"
            if args.compare and trained.config.trainable.mode == "full":
                print("--compare needs a LoRA, prompt or prefix run; ignoring it.")
                args.compare = False
            base = (trained.frozen, {})
        else:
            max_seq_len = args.max_seq_len or load_hf_config(args.model).get(
                "max_position_embeddings", 2048
            )
            model_config, params = load_pretrained(args.model, max_seq_len=max_seq_len)
            tokenizer, model_kwargs, label = load_tokenizer(args.model), {}, args.model
            args.compare = False
    except (ValueError, FileNotFoundError) as err:
        # ConfigError and ModelLoadError are UserErrors already; other input errors become one.
        if isinstance(err, UserError):
            raise
        raise ConfigError(str(err)) from None

    t0 = time.perf_counter()
    answers = answer(model_config, params, model_kwargs, tokenizer, args.prompt, args)
    seconds = time.perf_counter() - t0
    base_answers = (
        answer(model_config, base[0], base[1], tokenizer, args.prompt, args)
        if args.compare
        else None
    )
    for i, prompt in enumerate(args.prompt):
        print(f"### prompt: {prompt}")
        print(f"[{label}] {answers[i]}")
        if base_answers is not None:
            print(f"[base] {base_answers[i]}")
        print()
    print(
        f"generated {len(args.prompt)} x {args.max_new_tokens} tokens in {seconds:.1f} s "
        "(including compilation)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_script("generate", _generate, argv)


if __name__ == "__main__":
    exit_process(main())
