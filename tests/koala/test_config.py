import pytest

from koala.config import PROFILES, load_config
from koala.errors import KoalaError


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_validate(profile):
    cfg = load_config(profile)
    assert cfg.target.spec == "smollm2-135m-instruct"


def test_overrides_keep_types():
    cfg = load_config("smoke", overrides=["training.steps=7", "eval.temperature=0.7", "drafter.copy_layers=[0, 29]"])
    assert cfg.training.steps == 7 and cfg.eval.temperature == 0.7 and cfg.drafter.copy_layers == [0, 29]


def test_unknown_key_names_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  stepz: 3\n")
    with pytest.raises(KoalaError, match=r"field training\.stepz: Extra inputs are not permitted"):
        load_config(path=p)


def test_wrong_type_names_the_field():
    with pytest.raises(KoalaError, match=r"field eval\.gamma: .*positive integer, DEPTHxTOPKxNODES .*or auto.*'many'"):
        load_config("smoke", overrides=["eval.gamma=many"])
    assert load_config("smoke", overrides=["eval.gamma=3"]).eval.gamma == 3
    assert load_config("smoke", overrides=["eval.gamma=auto"]).eval.gamma == "auto"
    assert load_config("smoke", overrides=["eval.gamma=4x3"]).eval.gamma == "4x3x12"  # a tree, normalised


def test_bad_literal_names_the_field():
    with pytest.raises(KoalaError, match=r"field training\.loss"):
        load_config("smoke", overrides=["training.loss=mse"])


def test_unknown_profile_and_bad_yaml(tmp_path):
    with pytest.raises(KoalaError, match="unknown profile 'nope'"):
        load_config("nope")
    p = tmp_path / "bad.yaml"
    p.write_text("training: [unclosed\n")
    with pytest.raises(KoalaError, match="not valid YAML"):
        load_config(path=p)


def test_more_evaluations_and_teacher_forcing_validate():
    from koala.config import load_config

    cfg = load_config("default")
    assert cfg.teacher_forced.limit > 0 and cfg.training.finetune_steps > 0
    assert cfg.eval.also == ["humaneval:40", "sharegpt-heldout:40"]
    with pytest.raises(KoalaError, match="field eval.also.*BENCH:LIMIT"):
        load_config("smoke", overrides=["eval.also=[humaneval:forty]"])
    from koala.config import parse_bench

    assert parse_bench("hf:org/name:20") == ("hf:org/name", 20) and parse_bench("mtbench") == ("mtbench", None)
    assert load_config("smoke", overrides=["eval.also=[hf:org/name, humaneval:40]"]).eval.also[0] == "hf:org/name"
    with pytest.raises(KoalaError, match="field training.unroll"):
        load_config("smoke", overrides=["training.unroll=0"])
    with pytest.raises(KoalaError, match="field teacher_forced.limit"):
        load_config("smoke", overrides=["teacher_forced.limit=-1"])


def test_loss_and_drafter_names_have_one_source():
    """The config's names are the ones the code implements (the CLI and the flows read them from koala.config)."""
    import typing

    from koala.config import DRAFTER_KINDS, HEAD_KINDS, LOSS_NAMES, DrafterConfig, TrainingConfig
    from koala.training.losses import LOSSES

    assert set(LOSS_NAMES) == set(LOSSES)
    assert typing.get_args(TrainingConfig.model_fields["loss"].annotation) == LOSS_NAMES
    assert typing.get_args(DrafterConfig.model_fields["kind"].annotation) == DRAFTER_KINDS
    assert set(HEAD_KINDS) <= set(DRAFTER_KINDS)


def test_cross_field_settings_are_checked_and_old_names_still_read():
    from koala.config import KoalaConfig

    with pytest.raises(KoalaError, match="eval.gamma 6 exceeds drafter.medusa_heads 4"):
        load_config("smoke", overrides=["drafter.kind=medusa", "drafter.medusa_heads=4", "eval.gamma=6"])
    assert load_config("smoke", overrides=["drafter.kind=medusa", "eval.gamma=auto"]).drafter.medusa_heads == 4
    assert KoalaConfig.model_validate({"drafter": {"n_heads": 3}}).drafter.medusa_heads == 3  # the old name
    with pytest.raises(KoalaError, match="distributed.nodes 2 trains the independent drafter"):
        load_config("smoke", overrides=["distributed.nodes=2"])  # the smoke profile trains EAGLE heads
    assert load_config("smoke", overrides=["distributed.nodes=2", "drafter.kind=draft_model"]).distributed.nodes == 2
    with pytest.raises(KoalaError, match="drafter.kind"):
        load_config("smoke", overrides=["drafter.kind=truncate"])  # a baseline spec, not a trainable kind
