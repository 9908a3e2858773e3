"""Drafter specs are parsed once into typed objects; a malformed one is one line naming it and the fix."""

from pathlib import Path

import pytest

from koala.engine.drafter_spec import CausalLM, Heads, LookupFirst, NGram, Truncate, parse_drafter_spec
from koala.errors import KoalaError


@pytest.mark.parametrize("spec,parsed", [
    ("truncate:2", Truncate(2)), ("ngram", NGram(3)), ("ngram:5", NGram(5)), ("heads:runs/h", Heads(Path("runs/h"))),
    ("lookup+truncate:1", LookupFirst(Truncate(1))), ("lookup+heads:x", LookupFirst(Heads(Path("x")))),
    ("runs/drafter", CausalLM("runs/drafter")), ("HuggingFaceTB/SmolLM2-135M", CausalLM("HuggingFaceTB/SmolLM2-135M")),
    ("model.gguf", CausalLM("model.gguf")),
])
def test_specs_parse_into_typed_objects(spec, parsed):
    assert parse_drafter_spec(spec) == parsed


@pytest.mark.parametrize("spec,says", [
    ("truncate:x", "truncate:N"), ("truncate:0", "truncate:N"), ("ngram:0", "ngram:N"), ("heads:", "heads:PATH"),
    ("lookup+ngram", "lookup\\+ goes in front"), ("lookup+lookup+truncate:1", "lookup\\+ goes in front"), ("", "give"),
])
def test_malformed_specs_say_how_to_write_them(spec, says):
    with pytest.raises(KoalaError, match=says):
        parse_drafter_spec(spec)
