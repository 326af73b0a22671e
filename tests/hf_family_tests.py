"""The HF conversion tests every family runs; tests/test_hf_<family>.py sets the `recipe` fixture and imports these.

What they show, per family: a checkpoint of a 2-rank run (TP=2; DP=2 under ZeRO-3) exports to an HF directory
whose transformers-loaded model gives dnascale's logits within 1e-5 in fp32 (for TP=2 against the model running
at TP=2 on each rank's own weights, so the merge is checked, not assumed); HF -> dnascale (tp 1 and 2) -> HF is
bit-identical; and user mistakes get one-line errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_helpers import run_distributed
from hf_helpers import (SEQUENCES, cli_error, dnascale_logits, family_inputs, make_checkpoints, same_directories,
                        tp2_reference_worker)

pytestmark = pytest.mark.distributed
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, recipe):
    return make_checkpoints(tmp_path_factory, recipe)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoints):
    """{"tp2"|"dp2": (ConsolidatedCheckpoint, HF dir)}."""
    from dnascale.convert.consolidate import consolidate
    from dnascale.hf.export import ExportOptions, export_hf

    out = {}
    for kind, run_dir in checkpoints.items():
        consolidated = consolidate(run_dir, progress=False)
        hf_dir = export_hf(consolidated, tmp_path_factory.mktemp(f"hf-{kind}"), ExportOptions(progress=False))
        out[kind] = (consolidated, hf_dir)
    return out


def _hf_head(recipe: str):
    import transformers

    from dnascale.models.registry import get_recipe

    masked = get_recipe(recipe).hf_adapter.masked_lm
    return transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForSeq2SeqLM


def test_dp2_zero3_export_loads_with_transformers_and_matches_dnascale(recipe, exported):
    import transformers

    from dnascale.hf.runtime import ensure_single_process_groups

    consolidated, hf_dir = exported["dp2"]
    assert consolidated.source_topology["dp"] == 2 and consolidated.source_topology["tp"] == 1
    ensure_single_process_groups()  # dnascale's megatron layers need their (world of one) groups
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == f"dnascale-{recipe}"
    reference = consolidated.recipe.build(consolidated.config, None)
    reference.load_state_dict(consolidated.state_dict, strict=False)
    inputs = family_inputs(recipe, consolidated.config, hf_dir)
    expected = dnascale_logits(reference, inputs)

    model = _hf_head(recipe).from_pretrained(str(hf_dir), trust_remote_code=True).eval()
    with torch.no_grad():
        got = model(**inputs).logits
        torch.testing.assert_close(got, expected, **TOL)
        if "ggram_ids" in inputs:  # DNAZEN matches the G-grams itself (shipped table) when given token ids only
            plain = {k: v for k, v in inputs.items() if not k.startswith("ggram")}
            torch.testing.assert_close(model(**plain).logits, expected, **TOL)
        base = transformers.AutoModel.from_pretrained(str(hf_dir), trust_remote_code=True).eval()
        extras = {k: v for k, v in inputs.items() if k.startswith("ggram")}
        hidden = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extras)
        torch.testing.assert_close(hidden.last_hidden_state,
                                   reference.eval().encode(inputs["input_ids"], inputs["attention_mask"], **extras),
                                   **TOL)
        classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(hf_dir), trust_remote_code=True, num_labels=3).eval()
        assert classifier(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extras
                          ).logits.shape == (2, 3)
    # The exported tokenizer gives the ids the checkpoint's own tokenizer gives.
    from dnascale.data.tokenizers import load_tokenizer

    own = load_tokenizer(consolidated.tokenizer["spec"])
    first = own.add_special(own.encode(SEQUENCES[0]))
    assert inputs["input_ids"][0, : len(first)].tolist() == [int(i) for i in first]


def test_tp2_export_matches_dnascale_at_tp2_and_init_weights_reload_it(recipe, exported, tmp_path):
    consolidated, hf_dir = exported["tp2"]
    assert consolidated.source_topology["tp"] == 2
    from dnascale.hf.load import read_hf, write_init_dir

    init_dir = write_init_dir(read_hf(hf_dir), tmp_path / "init-tp2", tp=2, progress=False)
    inputs = family_inputs(recipe, consolidated.config, hf_dir)
    torch.save(inputs, tmp_path / "inputs.pt")
    run_distributed(tp2_reference_worker, str(consolidated.tag_dir), str(init_dir), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "logits.pt"))
    reference = torch.load(tmp_path / "logits.pt", weights_only=True)

    model = _hf_head(recipe).from_pretrained(str(hf_dir), trust_remote_code=True).eval()
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, reference["checkpoint"], **TOL)
    torch.testing.assert_close(reference["init_dir"], reference["checkpoint"], **TOL)


@pytest.mark.parametrize("tp", [1, 2])
def test_hf_to_dnascale_to_hf_is_bit_identical(recipe, exported, tmp_path, tp):
    from dnascale.convert.consolidate import consolidate
    from dnascale.hf.export import ExportOptions, export_hf
    from dnascale.hf.load import read_hf, write_init_dir

    _, hf_dir = exported["tp2"]
    init_dir = write_init_dir(read_hf(hf_dir), tmp_path / "init", tp=tp, progress=False)
    assert len(list(init_dir.glob("tp_rank_*.safetensors"))) == tp
    back = export_hf(consolidate(init_dir, progress=False), tmp_path / "back", ExportOptions(progress=False))
    same_directories(hf_dir, back)


def test_sharded_bf16_export_has_an_index_and_loads(recipe, exported, tmp_path):
    from dnascale.hf.export import INDEX, ExportOptions, export_hf

    consolidated, _ = exported["dp2"]
    out = export_hf(consolidated, tmp_path / "bf16", ExportOptions(dtype="bf16", max_shard_bytes=200_000,
                                                                  progress=False))
    index = json.loads((out / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    model = _hf_head(recipe).from_pretrained(str(out), trust_remote_code=True).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inputs = family_inputs(recipe, consolidated.config, out)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_finetuning_starts_from_the_same_weights_via_tp2_checkpoint_hf_export_and_bf16_export(
        recipe, checkpoints, exported, tmp_path):
    """launchers/finetune.py's loader on the TP=2 run itself (shards merged), its HF export and a bf16 export."""
    from dnascale.finetune.run import FinetuneConfig, build_classifier, load_backbone
    from dnascale.hf.auto import family_classes
    from dnascale.hf.export import ExportOptions, export_hf
    from dnascale.hf.runtime import ensure_single_process_groups
    from dnascale.parallel import current_state

    consolidated, hf_dir = exported["tp2"]
    bf16_dir = export_hf(consolidated, tmp_path / "bf16", ExportOptions(dtype="bf16", progress=False))
    ensure_single_process_groups()
    expected = {"native": consolidated.state_dict, "hf": consolidated.state_dict,
                "bf16": {k: v.to(torch.bfloat16).float() for k, v in consolidated.state_dict.items()}}
    for kind, source in (("native", checkpoints["tp2"]), ("hf", hf_dir), ("bf16", bf16_dir)):
        backbone = load_backbone(FinetuneConfig(task="", out="", checkpoint=str(source), model=recipe))
        config = consolidated.config if kind == "native" else \
            family_classes(recipe)["AutoConfig"].with_export_files(consolidated.config, source)  # DNAZEN: its vocab
        assert (backbone.recipe, backbone.config) == (recipe, config), kind
        # Compared with the checkpoint's tensors, not with a second build under one seed, so weights that failed
        # to load cannot pass as equal random initialisations.
        torch.manual_seed(7)
        params = dict(build_classifier(backbone, 2, current_state()).named_parameters())
        loaded = {name[len("backbone."):]: p for name, p in params.items() if name.startswith("backbone.")}
        assert loaded and set(loaded) <= set(expected[kind]), kind
        for name, param in loaded.items():
            torch.testing.assert_close(param.detach(), expected[kind][name], rtol=0, atol=0, msg=f"{kind}: {name}")


def _edit_json(tag_dir: Path, name: str, change) -> None:
    """Edit a checkpoint's JSON file and keep its COMPLETE marker consistent (as a real such checkpoint's would be)."""
    path = tag_dir / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    marker = json.loads((tag_dir / "COMPLETE").read_text())
    marker["files"][name] = path.stat().st_size
    (tag_dir / "COMPLETE").write_text(json.dumps(marker))


def test_user_mistakes_get_one_line_errors(recipe, checkpoints, exported, tmp_path, capsys):
    import importlib.util

    import dataclasses

    from dnascale.models.registry import list_recipes, load_preset

    def tool(name):
        path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    to_hf, from_hf = tool("convert_to_hf"), tool("convert_from_hf")
    run = tmp_path / "run"
    shutil.copytree(checkpoints["dp2"], run)
    tag_dir = next((run / "checkpoints").glob("step_*"))
    out = str(tmp_path / "out")

    # Another family's name and config over these weights (as a mixed-up dnascale_model.json would have them).
    other = next(name for name in list_recipes() if name != recipe)
    original = json.loads((tag_dir / "dnascale_model.json").read_text())
    other_config = dataclasses.asdict(load_preset(other, "tiny"))
    _edit_json(tag_dir, "dnascale_model.json", lambda info: dict(info, recipe=other, config=other_config))
    message = cli_error(to_hf, [str(run), out, "--no-progress"], capsys)
    assert f"weights do not match the {other!r} model" in message and "another family" in message

    _edit_json(tag_dir, "dnascale_model.json", lambda info: original)
    wrong = "nucleotide-byte" if recipe != "enbed" else "nucleotide-char"
    _edit_json(tag_dir, "dnascale_model.json", lambda info: dict(info, tokenizer=dict(info["tokenizer"], spec=wrong)))
    assert "mismatched tokenizer" in cli_error(to_hf, [str(run), out, "--no-progress"], capsys)

    (tag_dir / "COMPLETE").unlink()
    message = cli_error(to_hf, [str(tag_dir), out, "--no-progress"], capsys)
    assert message.endswith("partial checkpoint (no COMPLETE marker); it was not finished")

    _, hf_dir = exported["tp2"]
    foreign = tmp_path / "foreign"
    shutil.copytree(hf_dir, foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    assert "model_type 'bert' is not a dnascale family" in cli_error(from_hf, [str(foreign), out], capsys)
    other_fields = dict(other_config, tp=1)
    (foreign / "config.json").write_text(json.dumps(dict(config, model_type=f"dnascale-{other}",
                                                          dnascale_config=other_fields)))
    message = cli_error(from_hf, [str(foreign), out], capsys)
    assert f"weights do not match the {other!r} model" in message and "another family" in message
    (foreign / "config.json").write_text(json.dumps(config))
    original_tokenizer = (foreign / "tokenizer.json").read_text()
    tokenizer = json.loads(original_tokenizer)
    tokenizer["added_tokens"].append({"id": 100_000, "content": "[EXTRA]", "special": True, "single_word": False,
                                      "lstrip": False, "rstrip": False, "normalized": False})
    (foreign / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert "mismatched tokenizer" in cli_error(from_hf, [str(foreign), out], capsys)
    (foreign / "tokenizer.json").write_text(original_tokenizer)
    assert "tp=3" in cli_error(from_hf, [str(hf_dir), out, "--tp", "3"], capsys)  # a size the heads do not split into
    (foreign / "model.safetensors").unlink()
    assert "no model.safetensors" in cli_error(from_hf, [str(foreign), out], capsys)


def test_fill_mask_pipeline_after_import_dnascale_without_remote_code(recipe, exported):
    import transformers

    import dnascale  # noqa: F401  (registers the Auto classes)

    consolidated, hf_dir = exported["dp2"]
    auto_map = json.loads((hf_dir / "config.json").read_text())["auto_map"]
    if not consolidated.recipe.hf_adapter.masked_lm:  # ENBED: an encoder-decoder, exported for seq2seq instead
        assert "AutoModelForMaskedLM" not in auto_map and "AutoModelForSeq2SeqLM" in auto_map
        return
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(hf_dir)).eval()  # no trust_remote_code
    assert type(model).__module__.startswith("dnascale.hf.")
    fill = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer)
    text = "ACGTACGTTTGACCAGTAC" + tokenizer.mask_token + "ATCGATCGGG"
    predictions = fill(text, top_k=3)
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0, batch["input_ids"][0] == tokenizer.mask_token_id][0]
    assert [p["token"] for p in predictions] == logits.topk(3).indices.tolist()

