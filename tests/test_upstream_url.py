"""An upstream's base_url: both ways users write it are accepted, nonsense is refused at load."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, load_config
from engine.upstream_url import normalize_base_url
from stages.ingest.pool import UpstreamConfig


@pytest.mark.parametrize(
    ("given", "root"),
    [
        ("http://localhost:1234", "http://localhost:1234"),
        ("http://localhost:1234/", "http://localhost:1234"),
        ("http://localhost:1234/v1", "http://localhost:1234"),  # how LM Studio and the OpenAI SDK write it
        ("http://localhost:1234/v1/", "http://localhost:1234"),
        ("https://example.test/openai/v1", "https://example.test/openai"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_the_root_url_whichever_form_is_given(given: str, root: str) -> None:
    assert normalize_base_url(given) == root
    assert UpstreamConfig(name="u", base_url=given).base_url == root


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("localhost:1234", "must be an http:// or https:// URL"),
        ("ftp://host", "must be an http:// or https:// URL"),
        ("http://host:99999", "port outside 1..65535"),
        ("http://host:0", "port in 1..65535"),
        ("http://user:secret@host:1234", "must not carry credentials"),
        ("http://host/?x=1", "no query"),
    ],
)
def test_a_bad_url_is_refused_at_load_with_the_key(tmp_path, given: str, problem: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[[upstreams]]\nname = "a"\nbase_url = "{given}"\n')
    with pytest.raises(ConfigError) as error:
        load_config(str(path), env={})
    assert "upstreams[0].base_url" in str(error.value) and problem in str(error.value)
    assert "secret" not in str(error.value)  # never echo credentials
