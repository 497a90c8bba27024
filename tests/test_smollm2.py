"""The real SmolLM2-135M-Instruct (converted by scripts/fetch_model.py): logits equal those of
transformers, and our cached generation answers a chat prompt. Skipped until it is fetched, except
under CI, where they fail (see the `smollm2_dir` fixture in conftest.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(smollm2_dir):
    from fedjax_llm.data import load_tokenizer
    from fedjax_llm.models.hf_loader import load_pretrained

    config, params = load_pretrained(smollm2_dir, max_seq_len=256)
    return config, params, load_tokenizer(smollm2_dir)


def test_architecture(loaded):
    config, _, tokenizer = loaded
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        30,
        576,
        9,
        3,
    )
    assert config.vocab_size == tokenizer.vocab_size == 49152
    assert config.tie_embeddings and tokenizer.has_chat_template


def test_logits_match_transformers(loaded, smollm2_dir):
    """Our float32 logits are as close to a float64 reference as transformers' own float32 ones."""
    torch = pytest.importorskip("torch")
    import transformers

    from fedjax_llm.models import llama

    config, params, tokenizer = loaded
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain federated learning in one sentence."}],
        add_generation_prompt=True,
    )
    tokens = np.asarray([ids])
    ours = np.asarray(llama.apply(config, params, jnp.asarray(tokens)))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
        exact = model.double()(torch.tensor(tokens)).logits.numpy()
    ours_err = np.abs(ours - exact).max()
    theirs_err = np.abs(theirs - exact).max()
    print(
        f"max |ours - torch f32| {np.abs(ours - theirs).max():.2e}; vs float64: ours "
        f"{ours_err:.2e}, torch f32 {theirs_err:.2e}; max |logit| {np.abs(exact).max():.1f}"
    )
    assert ours_err <= 2 * theirs_err + 1e-5
    assert (ours.argmax(-1) == exact.argmax(-1)).mean() > 0.99


def test_greedy_chat_answer(loaded):
    from fedjax_llm.models.generation import generate

    config, params, tokenizer = loaded
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    out = generate(
        config,
        params,
        jnp.asarray([ids]),
        jnp.ones((1, len(ids)), bool),
        max_new_tokens=16,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    answer = tokenizer.decode(np.asarray(out)[0].tolist())
    print(answer)
    assert "Paris" in answer
    for text in ("Federated learning keeps data local.", "naïve café – 東京 🚀", "x = 3.14\n\ty"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
