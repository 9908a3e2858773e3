import pytest

from koala import assets
from koala.errors import KoalaError
from koala.targets import encode_chat, load_target


def test_unknown_target_name():
    with pytest.raises(KoalaError, match="unknown target 'no-such-model'"):
        load_target("no-such-model")


def test_missing_gguf(tmp_path):
    with pytest.raises(KoalaError, match="does not exist"):
        load_target(str(tmp_path / "missing.gguf"))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(KoalaError, match="could not load target"):
        load_target(str(bad))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(KoalaError, match="holds no weights"):
        load_target(str(tmp_path))


def test_corrupt_default_gguf_asks_for_refetch(tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path))
    f = assets.cached_file("smollm2-135m-instruct")
    f.parent.mkdir(parents=True)
    f.write_bytes(b"not the model")
    with pytest.raises(KoalaError, match="corrupt.*koala assets fetch smollm2-135m-instruct"):
        load_target("smollm2-135m-instruct")


def test_bad_dtype():
    with pytest.raises(KoalaError, match="dtype must be one of"):
        load_target("smollm2-135m-instruct", dtype="int3")


def test_local_directory_roundtrip(tmp_path, tiny, default_target):
    # a tiny model saved with save_pretrained loads through the directory path, with the target's tokenizer
    model = tiny(vocab=default_target.info.vocab_size)
    model.save_pretrained(tmp_path)
    default_target.tokenizer.save_pretrained(tmp_path)
    t = load_target(str(tmp_path))
    assert t.info.vocab_size == default_target.info.vocab_size
    assert t.info.num_layers == 2
    assert len(t.info.content_hash) == 64


@pytest.mark.slow
def test_real_default_target(default_target):
    info = default_target.info
    assert info.name == "smollm2-135m-instruct"
    assert info.vocab_size == 49152 and info.num_layers == 30
    assert 130e6 < info.params < 140e6
    assert info.content_hash == assets.ASSETS["smollm2-135m-instruct"].sha256
    ids = encode_chat(default_target.tokenizer, [{"role": "user", "content": "Hi"}])
    text = default_target.tokenizer.decode(ids)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.rstrip().endswith("<|im_start|>assistant")


def test_empty_chat_is_an_error(default_target):
    with pytest.raises(KoalaError, match="empty prompt"):
        encode_chat(default_target.tokenizer, [])
