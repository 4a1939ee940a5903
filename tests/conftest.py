import pytest

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def corpus_cases():
    from corpus import build_corpus

    return build_corpus()
