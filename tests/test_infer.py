"""Genome-scale inference to zarr (tools/infer.py, dnascale/infer/) and SNV scoring (tools/score_variants.py).

Models are tiny overrides of each family's tiny preset, written as init directories (the format
tools/convert_from_hf.py writes and every loader reads), with random weights, except the variant test's encoder,
trained here for a few seconds on a repeated motif so that the sign of each score is known in advance.
The tools run in this process (their main(argv) inside run_cli), in one world of one for the module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dnascale.config import apply_overrides
from dnascale.data.fasta import read_segments
from dnascale.data.masking import MLMCollator
from dnascale.data.tokenizers import load_tokenizer
from dnascale.errors import run_cli
from dnascale.convert.consolidate import consolidate
from dnascale.finetune.inputs import EXTRAS
from dnascale.hf.export import ExportOptions, export_hf
from dnascale.hf.load import HFCheckpoint, write_init_dir
from dnascale.infer.backbone import load_model
from dnascale.infer.run import InferConfig, infer
from dnascale.infer.tiling import owners_by_definition, tile
from dnascale.infer.writer import read_array
from dnascale.models.registry import get_recipe, load_preset
from finetune_helpers import load_script

# Small enough that every pass is milliseconds; max_seq_len bounds the window (127 bases + template).
OVERRIDES = {
    "encoder": ["hidden=32", "layers=2", "heads=2", "ffn_hidden=64", "max_seq_len=128"],
    "enbed": ["hidden=32", "heads=2", "head_dim=16", "ffn_hidden=64", "encoder_layers=2", "decoder_layers=1",
              "encoder_window=4", "encoder_early_window=4", "decoder_window=16", "cross_window=8", "max_seq_len=128"],
    "dnazen": ["hidden=32", "layers=2", "heads=2", "ffn_hidden=64", "ggram_layers=1", "ggram_heads=2",
               "ggram_ffn_hidden=64", "max_seq_len=64", "window_bases=128"],
    "dnachunker": ["hidden=32", "headdim=16", "d_state=8", "trunk_layers=1", "heads=2", "ffn_hidden=64",
                   "max_seq_len=128", "ssm_chunk_size=32"],
}
FAMILIES = tuple(OVERRIDES)
MOTIF = b"ACGGTCATTGCA"  # period 12, no shorter period: each base is fixed by its neighbours


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core box: a second intra-op thread only spins against the other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_init_dir(model: torch.nn.Module, family: str, config, out: Path) -> Path:
    recipe = get_recipe(family)
    tokenizer = load_tokenizer(recipe.tokenizer)
    info = {"name": tokenizer.name, "spec": recipe.tokenizer, "vocab_size": tokenizer.vocab_size}
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}
    return write_init_dir(HFCheckpoint(out, recipe, "tiny", config, info, state), out, tp=1, progress=False)


def small_config(family: str, extra: tuple[str, ...] = ()):
    return apply_overrides(load_preset(family, "tiny"), [*OVERRIDES[family], *extra], source="test")


@pytest.fixture(scope="module")
def checkpoints(parallel, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        config = small_config(family)
        out[family] = save_init_dir(get_recipe(family).build(config, None), family, config, root / family)
    return out


def random_genome(path: Path, records: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for name, length in records.items():
            seq = bytearray(rng.choice(np.frombuffer(b"ACGT", dtype=np.uint8), length).tobytes())
            seq[length // 3 : length // 3 + 4] = b"NNNN"  # an N run stays in place (index i = base i)
            handle.write(f">{name} test record\n")
            for i in range(0, length, 60):
                handle.write(seq[i : i + 60].decode() + "\n")
    return path


@pytest.fixture(scope="module")
def genome(tmp_path_factory) -> Path:
    return random_genome(tmp_path_factory.mktemp("fa") / "genome.fa", {"chrA": 700, "chrB": 90})


def record_seq(fasta: Path, record: str) -> bytes:
    return next(s.seq for s in read_segments(fasta) if s.record == record)


def arrays(store: Path, record: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")[record]
    return {name: read_array(group, name) for name in group.array_keys()}


def run_tool(script, *argv: str, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a tool's main(argv) run the way its __main__ runs it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: script.main(list(argv)))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def infer_tool():
    return load_script("tools/infer.py", "infer_tool")


@pytest.fixture(scope="module")
def variants_tool():
    return load_script("tools/score_variants.py", "score_variants_tool")


# ------------------------------------------------------------------------------------------------ stitching rule


@pytest.mark.parametrize("length, window, stride", [
    (1, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 4), (50, 8, 8), (50, 8, 1), (51, 9, 4), (100, 16, 5), (37, 10, 7),
])
def test_owned_spans_follow_the_nearest_centre_rule(length, window, stride):
    tiling = tile(length, window, stride)
    owners = np.repeat(np.arange(len(tiling)), tiling.own_hi - tiling.own_lo)
    np.testing.assert_array_equal(owners, owners_by_definition(length, tiling))  # spans partition [0, L)
    assert (tiling.own_lo >= tiling.starts).all() and (tiling.own_hi <= tiling.ends).all()
    if length > window:  # every window is full width and inside the record; the last is flush with its end
        assert (tiling.ends - tiling.starts == window).all() and tiling.ends[-1] == length
        assert (np.diff(tiling.starts) <= stride).all() and (np.diff(tiling.starts) > 0).all()
        # interior bases keep at least floor((w - s) / 2) bases of context on either side
        for k in range(len(tiling)):
            bases = np.arange(tiling.own_lo[k], tiling.own_hi[k])
            left = np.where(tiling.starts[k] == 0, window, bases - tiling.starts[k])
            right = np.where(tiling.ends[k] == length, window, tiling.ends[k] - 1 - bases)
            assert min(left.min(), right.min()) >= (window - stride) // 2


def test_a_tie_goes_to_the_left_window():
    # windows [0,4) [3,7) [6,10): base 3 is 1.5 from the centres 1.5 and 4.5, base 6 from 4.5 and 7.5
    tiling = tile(10, 4, 3)
    assert tiling.starts.tolist() == [0, 3, 6]
    assert list(zip(tiling.own_lo.tolist(), tiling.own_hi.tolist())) == [(0, 4), (4, 7), (7, 10)]
    assert tiling.owner(3) == 0 and tiling.owner(6) == 1 and tiling.owner(7) == 2


# ------------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_a_record_in_one_window_equals_one_forward_pass(family, checkpoints, genome, tmp_path):
    what = ("embeddings", "mlm_score") + (("boundaries",) if family == "dnachunker" else ())
    out = tmp_path / "one.zarr"
    infer(InferConfig(str(checkpoints[family]), str(genome), str(out), what=what, records=("chrB",),
                      progress=False))
    stored = arrays(out, "chrB")
    seq = record_seq(genome, "chrB")
    model = load_model(str(checkpoints[family]), torch.device("cpu"))
    net, tok = model.runner.model, model.runner.tokenizer
    pieces = tok.encode(seq).astype(np.int64)
    ids = torch.as_tensor(tok.add_special(pieces).astype(np.int64))[None]
    mask = torch.ones_like(ids, dtype=torch.bool)
    extras = EXTRAS[family](model.config, tok)(ids.numpy()) if family in EXTRAS else {}
    with torch.no_grad():
        states = net.encode(ids, mask, **extras)[0]
    # token of every base: template prefix + the pieces' lengths (one base per token except for BPE)
    lengths = [len(tok.tokens[int(i)]) for i in pieces] if family == "dnazen" else [1] * len(pieces)
    token = np.repeat(np.arange(len(pieces)), lengths) + len(tok.template.prefix)
    torch.testing.assert_close(torch.from_numpy(stored["embeddings"]), states[token], rtol=1e-4, atol=1e-5)
    acgt = np.isin(np.frombuffer(seq, dtype=np.uint8), np.frombuffer(b"ACGT", dtype=np.uint8))
    assert np.isfinite(stored["mlm_logp"][acgt]).all() and np.isnan(stored["mlm_logp"][~acgt]).all()
    assert (stored["mlm_logp"][acgt] <= 0).all()
    assert ((stored["mlm_entropy"][acgt] >= 0) & (stored["mlm_entropy"][acgt] <= np.log(4) + 1e-5)).all()
    if family == "dnachunker":
        with torch.no_grad():
            routing = net(ids, mask, return_routing=True).routing
        prob = stored["boundary_prob"]
        np.testing.assert_allclose(prob[:, 0], routing[0].prob[0, : len(seq)].numpy(), rtol=1e-4, atol=1e-6)
        # stage 2 lives on the first bases of stage-1 chunks only
        assert ((prob[:, 1] > 0) <= routing[0].boundary_bp[0, : len(seq)].numpy()).all()
        assert prob[0].tolist() == [1.0, 1.0]  # a sequence's first base always opens a chunk


def test_encoder_mlm_score_is_the_masked_log_likelihood_in_interleaved_groups(checkpoints, genome, tmp_path):
    out = tmp_path / "mlm.zarr"
    infer(InferConfig(str(checkpoints["encoder"]), str(genome), str(out), what=("mlm_score",), records=("chrB",),
                      mlm_groups=3, progress=False))
    stored = arrays(out, "chrB")["mlm_logp"]
    seq = record_seq(genome, "chrB")
    model = load_model(str(checkpoints["encoder"]), torch.device("cpu"))
    net, tok = model.runner.model, model.runner.tokenizer
    ids = torch.as_tensor(tok.add_special(tok.encode(seq)).astype(np.int64))
    acgt = torch.as_tensor(tok.encode(b"ACGT").astype(np.int64))
    expected = np.full(len(seq), np.nan, dtype=np.float32)
    for group in range(3):
        chosen = [i for i in range(len(seq)) if i % 3 == group and seq[i : i + 1] != b"N"]
        masked = ids.clone()
        masked[chosen] = tok.mask_id
        with torch.no_grad():
            logits = net(masked[None], return_logits=True).logits[0]
        logp = logits[:, acgt].log_softmax(-1)
        for i in chosen:
            expected[i] = float(logp[i, b"ACGT".index(seq[i : i + 1])])
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


def test_stitched_windows_equal_one_window_for_a_model_with_a_finite_receptive_field(checkpoints, genome, tmp_path):
    # ENBED's encoder sees 4 bases either side per layer (2 layers: 8); windows of 64 every 32 leave every owned
    # base >= 16 bases from its window's edges, so stitching must reproduce the single-window states exactly.
    whole, tiled = tmp_path / "whole.zarr", tmp_path / "tiled.zarr"
    common = dict(what=("embeddings",), records=("chrB",), progress=False)
    infer(InferConfig(str(checkpoints["enbed"]), str(genome), str(whole), **common))
    infer(InferConfig(str(checkpoints["enbed"]), str(genome), str(tiled), window=64, stride=32, batch_size=2,
                      chunk_bases=16, **common))
    np.testing.assert_allclose(arrays(tiled, "chrB")["embeddings"], arrays(whole, "chrB")["embeddings"],
                               rtol=1e-4, atol=1e-5)


def test_bf16_embeddings_are_stored_as_bit_patterns_and_decode(checkpoints, genome, tmp_path):
    fp32, bf16 = tmp_path / "fp32.zarr", tmp_path / "bf16.zarr"
    for out, dtype in ((fp32, "fp32"), (bf16, "bf16")):
        infer(InferConfig(str(checkpoints["encoder"]), str(genome), str(out), records=("chrB",), dtype=dtype,
                          progress=False))
    group = zarr.open_group(str(bf16), mode="r")["chrB"]
    assert group["embeddings"].dtype == np.uint16
    decoded, exact = arrays(bf16, "chrB")["embeddings"], arrays(fp32, "chrB")["embeddings"]
    np.testing.assert_allclose(decoded, exact, rtol=2 ** -8, atol=1e-6)  # bfloat16 keeps 8 significant bits
    attrs = dict(zarr.open_group(str(bf16), mode="r").attrs)["dnascale_infer"]["settings"]
    assert attrs["dtype"] == "bf16" and attrs["recipe"] == "encoder" and attrs["window"] == 127


# ------------------------------------------------------------------------------------------------ resume


def test_a_killed_run_resumes_to_identical_arrays(checkpoints, genome, tmp_path, infer_tool, capsys):
    common = dict(what=("embeddings", "mlm_score"), window=64, stride=32, batch_size=3, chunk_bases=48,
                  progress=False)
    reference, resumed = tmp_path / "ref.zarr", tmp_path / "resumed.zarr"
    infer(InferConfig(str(checkpoints["encoder"]), str(genome), str(reference), **common))

    class Killed(KeyboardInterrupt):
        pass

    def kill_after_five(record: str, chunk: int) -> None:
        if (record, chunk) == ("chrA", 4):
            raise Killed

    with pytest.raises(Killed):
        infer(InferConfig(str(checkpoints["encoder"]), str(genome), str(resumed), **common),
              on_chunk=kill_after_five)
    group = zarr.open_group(str(resumed), mode="r")["chrA"]
    assert group.attrs["chunks_done"] == 5 and not group.attrs["complete"]
    summary = infer(InferConfig(str(checkpoints["encoder"]), str(genome), str(resumed), **common))
    assert summary.bases_computed == 700 + 90 - 5 * 48  # the five stored chunks were kept, not recomputed
    for record in ("chrA", "chrB"):
        want, got = arrays(reference, record), arrays(resumed, record)
        assert want.keys() == got.keys() == {"embeddings", "mlm_logp", "mlm_entropy"}
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    again = infer(InferConfig(str(checkpoints["encoder"]), str(genome), str(resumed), **common))
    assert again.bases_computed == 0
    # the same store with another stride: refused in one line naming the setting
    status, _, err = run_tool(infer_tool, str(checkpoints["encoder"]), str(genome), "--out", str(resumed),
                           "--window", "64", "--stride", "16", "--chunk-bases", "48", "--no-progress",
                           capsys=capsys)
    assert status == 2 and err.count("\n") == 1 and "stride=32 (now 16)" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_are_one_line_errors(checkpoints, genome, tmp_path, infer_tool, capsys):
    encoder = str(checkpoints["encoder"])
    corrupt = tmp_path / "corrupt.zarr"
    infer(InferConfig(encoder, str(genome), str(corrupt), records=("chrB",), progress=False))
    (corrupt / "zarr.json").write_text("{ not json")
    not_zarr = tmp_path / "notes"
    not_zarr.mkdir()
    (not_zarr / "readme.txt").write_text("mine")
    cases = [
        (["--records", "chrZ"], "no record named 'chrZ'"),
        (["--window", "500"], "takes at most 127 bases per window"),
        (["--what", "boundaries"], "only dnachunker models have chunk boundaries"),
        (["--what", "logits"], "choose some of embeddings, mlm_score, boundaries"),
    ]
    for extra, message in cases:
        status, _, err = run_tool(infer_tool, encoder, str(genome), "--out", str(tmp_path / "x.zarr"), "--no-progress",
                               *extra, capsys=capsys)
        assert status == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, (extra, err)
    for store, message in ((corrupt, "unreadable zarr store"), (not_zarr, "not a zarr store")):
        status, _, err = run_tool(infer_tool, encoder, str(genome), "--out", str(store), "--records", "chrB",
                               "--no-progress", capsys=capsys)
        assert status == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    status, _, err = run_tool(infer_tool, str(tmp_path / "nothing"), str(genome), "--out", str(tmp_path / "y.zarr"),
                           capsys=capsys)
    assert status == 2 and err.count("\n") == 1 and "no such checkpoint" in err


# ------------------------------------------------------------------------------------------------ variants


def train_repeat_encoder(steps: int, genome: bytes, out: Path) -> Path:
    """A tiny encoder trained with the encoder recipe's masking on windows of a repeated motif."""
    config = small_config("encoder", ("max_seq_len=49",))
    torch.manual_seed(0)
    model = get_recipe("encoder").build(config, None)
    tokenizer = load_tokenizer("nucleotide-char")
    collate = MLMCollator(tokenizer, seed=0, max_length=config.max_seq_len)
    ids = tokenizer.encode(genome).astype(np.int64)
    width = config.max_seq_len - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    batch_rows = 16
    for step in range(steps):
        starts = rng.integers(0, len(ids) - width, batch_rows)
        batch = collate([{"ids": ids[s : s + width], "epoch": 0, "index": step * batch_rows + i}
                         for i, s in enumerate(starts)])
        loss = model(batch.input_ids, batch.attention_mask, batch.labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_init_dir(model.eval(), "encoder", config, out)


def test_variant_scores_have_the_sign_a_repeat_model_implies(parallel, tmp_path, variants_tool, infer_tool, capsys):
    repeat = MOTIF * 100
    checkpoint = train_repeat_encoder(150, repeat, tmp_path / "repeat-encoder")
    # The genome carries one planted break of the repeat (position 601, 1-based).
    planted = 600
    motif_base = repeat[planted : planted + 1].decode()
    broken = "T" if motif_base != "T" else "A"
    genome = bytearray(repeat)
    genome[planted : planted + 1] = broken.encode()
    fasta = tmp_path / "repeat.fa"
    fasta.write_text(">rep\n" + genome.decode() + "\n")

    def other(base: str) -> str:
        return next(b for b in "ACGT" if b != base)

    breaking = [p for p in (24, 133, 250, 377, 1100) if abs(p - planted) > 60]
    lines = ["##fileformat=VCFv4.2", "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    for p in breaking:  # reference = the motif; the ALT breaks it
        lines.append(f"rep\t{p + 1}\t.\t{chr(genome[p])}\t{other(chr(genome[p]))}\t.\t.\t.")
    lines.append(f"rep\t{planted + 1}\t.\t{broken}\t{motif_base}\t.\t.\t.")  # restores the repeat
    lines.append(f"rep\t{41}\t.\t{chr(genome[40])}{chr(genome[41])}\t{chr(genome[40])}\t.\t.\t.")  # deletion
    lines.append(f"rep\t{90}\t.\t{chr(genome[89])}\t<DEL>\t.\t.\t.")  # symbolic
    vcf = tmp_path / "variants.vcf"
    vcf.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.tsv"
    status, printed, _ = run_tool(variants_tool, str(checkpoint), str(fasta), str(vcf), "--out", str(out),
                                  capsys=capsys)
    assert status == 0
    assert "scored 6 SNV(s); skipped 2 non-SNV allele(s) (indel 1, symbolic allele 1)" in printed
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    header, rows = rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]
    assert header[:5] == ["chrom", "pos", "ref", "alt", "llr"] and len(rows) == len(breaking) + 3
    scored = [r for r in rows if r["status"] == "scored"]
    assert [float(r["llr"]) < 0 for r in scored[:-1]] == [True] * len(breaking)
    assert int(scored[-1]["pos"]) == planted + 1 and float(scored[-1]["llr"]) > 0
    assert [r["status"] for r in rows if r["status"] != "scored"] == ["skipped: indel", "skipped: symbolic allele"]

    # The same model as an HF export (tools/convert_to_hf.py's writer) scores the same.
    hf_dir = export_hf(consolidate(checkpoint, progress=False), tmp_path / "repeat-hf", ExportOptions(progress=False))
    status, _, _ = run_tool(variants_tool, str(hf_dir), str(fasta), str(vcf), "--out", str(tmp_path / "hf.tsv"),
                            capsys=capsys)
    assert status == 0
    from_hf = [line.split("\t") for line in (tmp_path / "hf.tsv").read_text().splitlines()[1:]]
    np.testing.assert_allclose([float(r[4]) for r in from_hf if r[7] == "scored"],
                               [float(r["llr"]) for r in scored], rtol=1e-5, atol=1e-5)

    # A TSV with a REF that is not the genome's: one line naming the variant's line.
    tsv = tmp_path / "bad.tsv"
    wrong = other(chr(genome[9]))
    tsv.write_text(f"CHROM\tPOS\tREF\tALT\nrep\t5\t{chr(genome[4])}\tA\nrep\t10\t{wrong}\tG\n")
    status, _, err = run_tool(variants_tool, str(checkpoint), str(fasta), str(tsv), "--out", str(tmp_path / "b.tsv"),
                           capsys=capsys)
    assert status == 2 and err.count("\n") == 1 and f"{tsv}:3: REF '{wrong}' at rep:10" in err

    # mlm_score along the genome: the planted break is the least likely base of the record.
    store = tmp_path / "repeat.zarr"
    status, _, _ = run_tool(infer_tool, str(checkpoint), str(fasta), "--out", str(store), "--what", "mlm_score",
                         "--no-progress", capsys=capsys)
    assert status == 0
    logp = arrays(store, "rep")["mlm_logp"]
    assert int(np.nanargmin(logp)) == planted and np.nanmedian(logp) > np.log(0.5)
