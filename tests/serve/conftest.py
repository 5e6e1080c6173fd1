"""Fixtures of the server tests: the tiny checkpoint, the offline engine over it, and one shared server per
module. (The [serve] extra is imported lazily: the test modules skip themselves without it.)"""

import pytest


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    from _serving import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-server"))


@pytest.fixture(scope="session")
def offline(ckpt):
    from _serving import ENGINE_KW

    from ringlinear.engine.llm import LLM

    return LLM(ckpt, device="cpu", **ENGINE_KW)


@pytest.fixture(scope="module")
def server(ckpt):
    from _serving import running_server

    with running_server(ckpt) as s:
        yield s
