"""The shared test corpus (../shared/corpus next to the checkout, as CI provides it): one place that finds it."""

import pathlib

import pytest

SHARED_CORPUS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "corpus"


def corpus_file(name: str) -> pathlib.Path:
    """Path of a file of the shared corpus; a one-line failure naming what is missing if it is not there."""
    path = SHARED_CORPUS / name
    if not path.is_file():
        pytest.fail(f"{path} not found: these tests read the shared corpus at ../shared/corpus next to the checkout "
                    f"(CI provides it); put the checkout beside it", pytrace=False)
    return path
