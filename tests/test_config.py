"""params.yaml parsing: defaults, overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from matryoshka_reranker.config import Params, ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_parse():
    params = load_params(REPO / "params.yaml")
    assert params.export.exit_layers == [8, 16, 24, 30]
    assert params.model.max_length == params.model.query_max_len + params.model.passage_max_len


def test_overrides_are_dotted_and_yaml_typed():
    params = load_params(REPO / "params.yaml", ["export.exit_layers=[4, 8]", "self_distill.max_steps=3",
                                                "gate.max_drop_rel=null"])
    assert params.export.exit_layers == [4, 8]
    assert params.self_distill.max_steps == 3
    assert params.gate.max_drop_rel is None


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"self_distill": {"max_stpes": 3}}, "self_distill.max_stpes: unknown key"),
        ({"model": {"start_layer": 0}}, "model.start_layer"),
        ({"compression": {"ratios": [0]}}, "compression.ratios"),
        ({"self_distill": {"train_method": "magic"}}, "self_distill.train_method"),
        ({"export": {"exit_layers": [2]}}, "export.exit_layers [2] have no score head"),
        ({"export": {"ratios": [8]}}, "export.ratios [8] have no token adapter"),
        ({"bogus": 1}, "bogus: unknown key"),
        # settings that must agree: each error names both keys
        ({"export": {"compress_layers": [12]}}, "export.compress_layers [12] differ from compression.layers [8]"),
        ({"compression": {"ratios": [1, 2]}}, "compensation.token_ratios [4] are not in compression.ratios"),
        ({"compression": {"layers": []}, "export": {"ratios": [1], "compress_layers": []}},
         "compensation.token_ratios [2, 4] need compression.layers"),
        ({"model": {"query_max_len": 2}}, "model.query_max_len"),
        ({"model": {"prompt": ""}}, "model.prompt"),
        ({"teacher": {"kind": "oracle"}}, "teacher.kind"),
        ({"self_distill": {"head_init": "magic"}}, "self_distill.head_init"),
        ({"evaluation": {"measures": ["ndcg@10"]}}, "evaluation.measures: Value error, 'ndcg@10' is not an ir-measures"),
        ({"evaluation": {"measures": []}}, "evaluation.measures"),
        ({"evaluation": {"effects": True}, "export": {"ratios": [2]}}, "evaluation.effects measures each ratio's drop"),
    ],
)
def test_errors_name_the_key(raw, key):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert key in str(err.value)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({}))
    with pytest.raises(ParamsError, match="dotted.key=value"):
        load_params(good, ["no-equals-sign"])



def test_a_params_path_that_is_a_folder_or_not_utf8_is_a_params_error(tmp_path):
    """`-p configs/experiments` (a folder) was an IsADirectoryError traceback, and a params file that is not
    UTF-8 a bare codec error naming no file."""
    with pytest.raises(ParamsError, match="is not a file"):
        load_params(tmp_path)
    latin1 = tmp_path / "params.yaml"
    latin1.write_bytes(b"model:\n  prompt: caf\xe9\n")
    with pytest.raises(ParamsError, match="params.yaml: not UTF-8"):
        load_params(latin1)


@pytest.mark.parametrize("override, message", [
    ("model.start_layer=true", "model.start_layer: .*expected a number, got true"),
    ("self_distill.learning_rate=false", "self_distill.learning_rate: .*expected a number"),
    ("export.share_weights=1", "export.share_weights: .*expected true or false, got 1"),
    ("export.share_weights=yes please", "export.share_weights: .*expected true or false"),
])
def test_a_bool_is_not_a_number_nor_a_number_a_bool(tmp_path, override, message):
    """pydantic's lax mode reads true as 1 and 1 as true: `-S model.start_layer=true` trained from layer 1."""
    good = tmp_path / "params.yaml"
    good.write_text(yaml.safe_dump({}))
    with pytest.raises(ParamsError, match=message):
        load_params(good, [override])
    assert load_params(good, ["model.start_layer=4", "export.share_weights=false"]).model.start_layer == 4



def test_a_sub_section_given_in_part_keeps_its_own_defaults():
    """`compensation.token: {max_steps: 1200}` in a user's params file must keep the token adapter's
    objective (same_layer_mse), not fall back to the generic TrainParams default (distill_fix_layer_teacher)."""
    p = parse_params({"compensation": {"token": {"max_steps": 1200}, "layer": {"learning_rate": 1e-4}},
                      "specialist": {"lora": {"dropout": 0.1}}})
    assert (p.compensation.token.train_method, p.compensation.token.max_steps) == ("same_layer_mse", 1200)
    assert (p.compensation.layer.train_method, p.compensation.layer.learning_rate) == ("distill_last_layer", 1e-4)
    assert (p.specialist.lora.rank, p.specialist.lora.alpha, p.specialist.lora.dropout) == (64, 128, 0.1)
    assert parse_params({"compensation": {"token": {"train_method": "distill_last_layer"}}}
                        ).compensation.token.train_method == "distill_last_layer"


def test_a_repeated_key_is_refused_not_last_wins(tmp_path):
    """yaml.safe_load keeps the last of two equal keys: a `data:` section appended at the end would silently
    drop the first one (eval_queries back at its default)."""
    twice = tmp_path / "params.yaml"
    twice.write_text("data:\n  eval_queries: 100\nmodel:\n  start_layer: 4\ndata:\n  beir_dir: data/mine\n")
    with pytest.raises(ParamsError, match="key 'data' appears twice") as err:
        load_params(twice)
    assert "line 5" in str(err.value)
    inner = tmp_path / "inner.yaml"
    inner.write_text("self_distill:\n  max_steps: 16\n  max_steps: 32\n")
    with pytest.raises(ParamsError, match="key 'max_steps' appears twice"):
        load_params(inner)
    merged = tmp_path / "merged.yaml"  # a YAML merge key may still override what it merges
    merged.write_text("self_distill: &sd {max_steps: 16}\nspecialist:\n  <<: *sd\n  max_steps: 32\n")
    assert load_params(merged).specialist.max_steps == 32


def test_ratio_one_only_export_needs_no_matching_compress_layers():
    params = parse_params({"export": {"ratios": [1], "compress_layers": [12]}})
    assert params.export.compress_layers == [12]  # nothing is compressed, so nothing to disagree with


def test_input_format_is_built_once_from_model_params():
    params = parse_params({"model": {"prompt": "Relevant?", "query_max_len": 16, "passage_max_len": 48}})
    fmt = params.model.input_format
    assert (fmt.prompt, fmt.query_max_len, fmt.passage_max_len, fmt.max_length) == ("Relevant?", 16, 48, 64)
    assert params.model.max_length == 64


def test_fingerprint_changes_with_params():
    assert Params().fingerprint() != parse_params({"self_distill": {"max_steps": 99}}).fingerprint()


def test_experiment_args_are_valid_dvc_set_params(tmp_path, monkeypatch):
    """A named params set becomes `-S` overrides that DVC's (Hydra's) grammar parses, mappings included."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from typer.testing import CliRunner

    from matryoshka_reranker.cli import app

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "configs" / "experiments").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text((root / "params.yaml").read_text())
    (tmp_path / "configs" / "experiments" / "x.yaml").write_text(
        "teacher.kind: hybrid\ncompression.ratios: [1, 2]\nself_distill.layer_weights: {8: 8.0}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["experiment-args", "x"])
    assert result.exit_code == 0, result.output
    args = result.output.split()
    overrides = args[1::2]
    assert args[::2] == ["-S"] * 4
    checkpoints = tmp_path.resolve() / "checkpoints" / "experiments" / "x"  # outside `dvc exp run --temp`'s copy
    assert overrides == ['teacher.kind="hybrid"', "compression.ratios=[1,2]", "++self_distill.layer_weights={8:8.0}",
                         f'paths.checkpoints="{checkpoints}"']
    parsed = OverridesParser.create().parse_overrides(overrides)
    assert parsed[2].value() == {8: 8.0} and parsed[1].value() == [1, 2] and parsed[3].value() == str(checkpoints)
    (tmp_path / "configs" / "experiments" / "y.yaml").write_text("paths.checkpoints: elsewhere\n")
    assert CliRunner().invoke(app, ["experiment-args", "y"]).output.split() == ["-S", 'paths.checkpoints="elsewhere"']


@pytest.mark.parametrize("folder", ["josé", "with space"])
def test_experiment_args_keep_the_checkout_path_as_it_is_or_refuse_it(tmp_path, monkeypatch, folder):
    """A non-ASCII checkout path reaches DVC unescaped; one that the Makefile's word splitting would break
    is refused with a message instead of a Hydra lexer error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from typer.testing import CliRunner

    from matryoshka_reranker.cli import app

    root = Path(__file__).resolve().parents[1]
    checkout = tmp_path / folder
    (checkout / "configs" / "experiments").mkdir(parents=True)
    (checkout / "params.yaml").write_text((root / "params.yaml").read_text())
    (checkout / "configs" / "experiments" / "x.yaml").write_text("teacher.kind: hybrid\n")
    monkeypatch.chdir(checkout)
    result = CliRunner().invoke(app, ["experiment-args", "x"])
    if " " in folder:
        assert result.exit_code == 2 and "paths.checkpoints" in result.output, result.output
        return
    assert result.exit_code == 0, result.output
    override = result.output.split()[-1]
    parsed = OverridesParser.create().parse_overrides([override])[0]
    assert parsed.value() == str(checkout.resolve() / "checkpoints" / "experiments" / "x")


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiments")
                                        .glob("*.yaml")))
def test_every_shipped_params_set_is_valid_over_params_yaml(name, monkeypatch):
    """`make experiment EXP=<name>` must not fail on a key or an inconsistency hours into a run."""
    from typer.testing import CliRunner

    from matryoshka_reranker.cli import app

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    result = CliRunner().invoke(app, ["experiment-args", name])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("-S ")


def test_float16_export_with_int8_activation_schemes_is_refused_at_parse_time():
    """int8 / int8-token rewrite float32 graphs: with export.dtype float16 the error comes from the params,
    not from ONNX Runtime after the whole export ran."""
    with pytest.raises(ParamsError, match="rewrites float32 graphs"):
        parse_params({"export": {"dtype": "float16", "quantize": ["int8-token"]}})
    assert parse_params({"export": {"dtype": "float16", "quantize": ["int4"]}}).export.quantize == ["int4"]
