"""HF conversion of the `dnazen` family: the shared tests in tests/hf_family_tests.py on its 2-rank checkpoints."""

import pytest

from hf_family_tests import *  # noqa: F401,F403  (the tests and fixtures, collected here for this family)


@pytest.fixture(scope="module")
def recipe():
    return "dnazen"


def test_a_copied_export_fine_tunes_with_the_g_gram_vocabulary_it_carries(exported, tmp_path):
    """The run's vocabulary file is gone after export (another machine): the export's own copy is read."""
    import dataclasses
    import shutil

    from dnascale.data.ggram import GGramVocab
    from dnascale.data.tokenizers import load_tokenizer
    from dnascale.finetune.inputs import encode_task_splits
    from dnascale.finetune.run import FinetuneConfig, load_backbone
    from dnascale.finetune.tasks import load_task
    from dnascale.hf.dnazen import VOCAB_FILE
    from dnascale.hf.export import ExportOptions, export_hf
    from hf_helpers import REPO

    consolidated, _ = exported["dp2"]
    moved_vocab = tmp_path / "on-the-training-machine" / "vocab.tsv.gz"
    moved_vocab.parent.mkdir()
    shutil.copy(consolidated.config.ggram_vocab_path, moved_vocab)
    trained_with = dataclasses.replace(consolidated, config=dataclasses.replace(consolidated.config,
                                                                                ggram_vocab=str(moved_vocab)))
    hf_dir = export_hf(trained_with, tmp_path / "hf", ExportOptions(progress=False))
    copied = shutil.copytree(hf_dir, tmp_path / "elsewhere")
    shutil.rmtree(moved_vocab.parent)

    backbone = load_backbone(FinetuneConfig(task="", out="", checkpoint=str(copied)))
    assert backbone.config.ggram_vocab == str(copied / VOCAB_FILE)
    shipped, original = GGramVocab.load(copied / VOCAB_FILE), GGramVocab.load(consolidated.config.ggram_vocab_path)
    assert (shipped.tokens == original.tokens).all() and (shipped.lengths == original.lengths).all()
    task = load_task(REPO / "tests" / "data" / "gue_prom_core_tata_200")
    splits = encode_task_splits(task, "dnazen", backbone.config, load_tokenizer(backbone.tokenizer_spec))
    batch = next(splits["test"].batches(8))
    assert batch.extras["ggram_triplets"].shape[0] > 0  # real promoter sequences match G-grams
