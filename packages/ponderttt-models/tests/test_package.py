import importlib.metadata
import pathlib
import tomllib

import ponderttt.models


def test_version_matches_pyproject():
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert ponderttt.models.__version__ == declared == importlib.metadata.version("ponderttt-models")


def test_top_level_exports_are_the_submodule_objects():
    from ponderttt.models import adapter

    missing = [name for name in ponderttt.models.__all__ if not hasattr(ponderttt.models, name)]
    assert missing == []
    assert ponderttt.models.AdaptedLM is adapter.AdaptedLM
    assert ponderttt.models.TRAINABLE is adapter.TRAINABLE
