"""Parallel artifacts on the simulated NPU give what the single-PE artifact gives.

Tensor parallelism is fixed by the artifact; pipeline stages can be re-cut at load for a
blockwise artifact, and the PEs left over hold data-parallel replicas that serve
different requests of one batch.  Every setting must produce the same greedy tokens and
logits within 1e-3 of the single-PE build of the same weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from furiosa_build.config import ConfigError
from furiosa_runtime import LLM, SamplingParams
from furiosa_runtime.engine.sequence import Sequence
from furiosa_runtime.npu.artifact import load_artifact, smallest_bucket
from furiosa_runtime.npu.hardware import HardwareSpec
from furiosa_runtime.npu.isa import Program
from furiosa_runtime.npu.simulator import DeviceMemoryError, NPUSimulator
from tests.helpers import REPO, build

PROMPTS = [[5, 17, 33, 101, 7, 9], [300, 2, 44, 12, 8, 90, 1, 3, 250, 77, 6]]
NEW_TOKENS = 5
TP = "parallel.tensor_parallel_size"
PP = "parallel.pipeline_parallel_size"
DEVICES = "parallel.devices"

# (model, parallel overrides): tp in {2, 4, 8} where the heads allow, pp in {2, 3 uneven},
# on one device, part of one, and two devices.  tiny-mistral has 8 query / 2 KV heads and
# 4 layers; the other tiny models have 4 query / 2 KV heads (gpt2: 4 / 4) and 2 layers.
SETTINGS = [
    ("tiny-llama", [f"{DEVICES}=npu:0:0-1", f"{TP}=2"]),
    ("tiny-llama", [f"{DEVICES}='npu:0,npu:1'", f"{TP}=4", f"{PP}=2"]),  # and 2 data-parallel replicas
    ("tiny-mistral", [f"{DEVICES}=npu:0", f"{TP}=8"]),
    ("tiny-mistral", [f"{DEVICES}=npu:0:0-2", f"{PP}=3", "parallel.num_blocks_per_pp_stage=[1,2,1]"]),
    ("tiny-mistral", [f"{DEVICES}='npu:0,npu:1'", f"{TP}=8", f"{PP}=2"]),
    ("tiny-mistral", [f"{DEVICES}=npu:0:0-3", f"{TP}=2", f"{PP}=2"]),
    ("tiny-qwen3", [f"{DEVICES}=npu:0:0-3", f"{TP}=4"]),
    ("tiny-gemma", [f"{DEVICES}=npu:0:0-3", f"{TP}=4"]),
    ("tiny-gemma", [f"{DEVICES}=npu:0:0-1", f"{TP}=2", "+build.compiler_config_overrides={fuse: false}"]),  # unfused
    ("tiny-gpt2", [f"{DEVICES}=npu:0:0-3", f"{TP}=4"]),
    ("tiny-gpt2", [f"{DEVICES}=npu:0:0-1", f"{PP}=2"]),
    ("tiny-mixtral", [f"{DEVICES}=npu:0:0-3", f"{TP}=2", f"{PP}=2"]),  # experts split like gated MLPs
    ("tiny-phi3", [f"{DEVICES}=npu:0:0-1", f"{TP}=2"]),  # fused qkv / gate_up cut per segment
    ("tiny-olmo2", [f"{DEVICES}=npu:0:0-3", f"{TP}=2", f"{PP}=2"]),  # q/k norms over the split heads: distributed norms
]


Greedy = list[tuple[list[int], list[np.ndarray]]]


def greedy_together(llm, prompts: list[list[int]], new_tokens: int) -> Greedy:
    """Greedy decoding with the model runner: each prompt prefilled alone, then all decoded
    as one batch (with data parallelism, the rows of that batch live on different replicas,
    prompt i on replica i as the engine's placement would put them).
    Returns, per prompt, the tokens and the logits of every step."""
    runner, blocks = llm.engine.runner, llm.engine.blocks
    seqs = [Sequence(f"r{i}", None, list(p), SamplingParams(temperature=0), None, new_tokens) for i, p in enumerate(prompts)]
    steps: list[list[np.ndarray]] = [[] for _ in seqs]
    try:
        for i, (seq, logits) in enumerate(zip(seqs, steps)):
            blocks.allocate(seq.request_id, seq.num_tokens, replica=i % blocks.replicas)
            logits.append(runner.prefill([seq], smallest_bucket(runner.prefill_buckets, 1, seq.num_tokens))[0])
        for step in range(new_tokens):
            for seq, logits in zip(seqs, steps):
                seq.output_token_ids.append(int(np.argmax(logits[-1])))
                blocks.allocate(seq.request_id, seq.num_tokens)
            if step + 1 < new_tokens:
                bucket = smallest_bucket(runner.decode_buckets, len(seqs), max(s.num_tokens for s in seqs))
                for logits, row in zip(steps, runner.decode(seqs, bucket)):
                    logits.append(row)
    finally:
        for seq in seqs:
            blocks.free(seq.request_id)
    return [(seq.output_token_ids, logits) for seq, logits in zip(seqs, steps)]


def assert_same_generation(want: Greedy, candidate, prompts=PROMPTS, new_tokens=NEW_TOKENS) -> None:
    for (tokens, logits), (want_tokens, want_logits) in zip(greedy_together(candidate, prompts, new_tokens), want):
        assert tokens == want_tokens
        assert max(np.abs(got - expected).max() for got, expected in zip(logits, want_logits)) < 1e-3


@pytest.fixture(scope="module")
def single_pe(tmp_path_factory, cache_dir):
    """The single-PE artifact of each model, built on first use, and its greedy generation."""
    built: dict[str, tuple[Path, Greedy]] = {}

    def get(model: str) -> tuple[Path, Greedy]:
        if model not in built:
            root = tmp_path_factory.mktemp("single") / model
            build([f"model={model}", "buckets=tiny"], root, cache_dir)
            built[model] = (root, greedy_together(LLM(root), PROMPTS, NEW_TOKENS))
        return built[model]

    return get


def build_parallel(tmp_path_factory, cache_dir, model: str, overrides: list[str]) -> Path:
    out = tmp_path_factory.mktemp("parallel") / model
    build([f"model={model}", "buckets=tiny", *overrides], out, cache_dir)
    return out


@pytest.mark.parametrize(("model", "overrides"), SETTINGS, ids=[f"{m}-{'-'.join(o).replace(DEVICES, 'dev')}" for m, o in SETTINGS])
def test_parallel_artifact_generates_like_the_single_pe_one(model, overrides, single_pe, tmp_path_factory, cache_dir):
    parallel = LLM(build_parallel(tmp_path_factory, cache_dir, model, overrides))
    assert_same_generation(single_pe(model)[1], parallel)
    mesh = parallel.engine.simulator.mesh
    if mesh.tp > 1:
        assert parallel.engine.simulator.stats["collectives"] > 0  # all-reduce / all-gather really ran
    if mesh.pp > 1:
        assert parallel.engine.simulator.stats["transfers"] > 0  # activations crossed stages


# -- every tiny architecture at tp 2 and 4 ----------------------------------------------------

TINY_MODELS = sorted(path.stem for path in (REPO / "conf" / "model").glob("tiny-*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("model", TINY_MODELS)
def test_every_tiny_architecture_splits_over_the_pes_and_generates_like_one_pe(model, tp, single_pe, tmp_path_factory, cache_dir):
    """Each random-weight architecture split over tp PEs: the single-PE artifact's tokens and
    logits within 1e-3, with every split handled by a rule (no fallback to replicated
    compute) and the decoder layers' weight matrices really cut (not run whole on every PE)."""
    out = tmp_path_factory.mktemp("sweep") / f"{model}-tp{tp}"
    try:
        report = build([f"model={model}", "buckets=tiny", f"{DEVICES}=npu:0:0-{tp - 1}", f"{TP}={tp}"], out, cache_dir)
    except ConfigError as error:  # heads, KV heads or vocabulary that tp does not divide
        pytest.skip(str(error))
    llm = LLM(out)
    assert_same_generation(single_pe(model)[1], llm)
    assert llm.engine.simulator.stats["collectives"] > 0
    assert report.sharding == []
    assert block_weights_split(out) > 0.9  # all but norms (and a MoE router)


def block_weights_split(root: Path) -> float:
    """The share of a PE's block-program weight elements that are its chunk of a cut tensor."""
    artifact = load_artifact(root)
    cut = whole = 0
    for key in {t.program for p in artifact.pipelines for t in p.tasks if t.kind == "block"}:
        program = Program.model_validate_json((root / "programs" / f"{key}.json").read_text())
        for param in program.params:
            if param.name[2:] in program.tensor_parallel.params:
                cut += math.prod(param.shape)
            else:
                whole += math.prod(param.shape)
    return cut / (cut + whole)


@pytest.fixture(scope="module")
def llama_tp4(tmp_path_factory, cache_dir) -> Path:
    """tp=4 on a whole device: the other 4 PEs hold a second data-parallel replica."""
    return build_parallel(tmp_path_factory, cache_dir, "tiny-llama", [f"{DEVICES}=npu:0", f"{TP}=4"])


def test_data_parallel_replicas_serve_different_requests_of_one_batch(llama_tp4, single_pe):
    llm = LLM(llama_tp4)
    simulator = llm.engine.simulator
    assert (simulator.mesh.tp, simulator.mesh.dp) == (4, 2)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [tokens for tokens, _ in single_pe("tiny-llama")[1]]
    # Both replicas wrote KV cache: replica 0 on PEs 0-3, replica 1 on PEs 4-7.
    written = {name for name, pe in simulator.pes.items() if any(layer.k.any() for layer in pe.kv.values())}
    assert written == {f"npu:0:{p}" for p in range(8)}


def test_data_parallel_replicas_run_as_one_host_batch_with_the_single_pe_results(single_pe, monkeypatch):
    """A single-PE artifact on a whole device is 8 replicas.  The rows of all replicas run
    as one batch on the host (one execution per step, so more replicas never cost more host
    time), each row's KV stays on its own replica's PE, the results are the single PE's to
    the bit, and the modelled step is that of one replica running its own row."""
    root, want = single_pe("tiny-llama")
    llm = LLM(root, devices="npu:0")
    simulator, runner = llm.engine.simulator, llm.engine.runner
    assert simulator.mesh.dp == 8
    runs: list[object] = []
    run = simulator.run
    monkeypatch.setattr(simulator, "run", lambda bucket, feeds, replica=0: runs.append(replica) or run(bucket, feeds, replica))
    got = greedy_together(llm, PROMPTS, NEW_TOKENS)
    for (tokens, logits), (want_tokens, want_logits) in zip(got, want):
        assert tokens == want_tokens
        assert all(np.array_equal(a, b) for a, b in zip(logits, want_logits))
    assert runs == [0, 1] + [[0, 1]] * (NEW_TOKENS - 1)  # each prompt prefilled alone, then every step one batch
    written = {name for name, pe in simulator.pes.items() if any(layer.k.any() for layer in pe.kv.values())}
    assert written == {"npu:0:0", "npu:0:1"}
    one_row = smallest_bucket(runner.decode_buckets, 1, 1)
    assert one_row is not None and runner.last_step_seconds == simulator.step_seconds[simulator.pipeline(one_row).name]


def test_every_pe_holds_only_its_shard(llama_tp4, single_pe):
    root, _ = single_pe("tiny-llama")
    whole = NPUSimulator(root, load_artifact(root))
    split = NPUSimulator(llama_tp4, load_artifact(llama_tp4))
    (single_bytes,) = whole.memory_report().values()
    per_pe = split.memory_report()
    assert len(per_pe) == 8 and len(set(per_pe.values())) == 1  # 2 replicas x 4 ranks, equal shares
    assert max(per_pe.values()) < 0.4 * single_bytes  # 1/4 of the weights, 1/2 of the KV (replicated KV heads)
    assert split.device_memory_report() == {"npu:0": sum(per_pe.values())}


def test_loading_fails_clearly_above_a_pes_capacity(llama_tp4):
    small = HardwareSpec(hbm_bytes=8 * 32 * 1024)  # 32 KiB per PE, less than a quarter of tiny-llama
    with pytest.raises(DeviceMemoryError, match=r"^npu:0:0: .* needs .* MiB but only .* MiB of 0.0 GiB are free"):
        NPUSimulator(llama_tp4, load_artifact(llama_tp4), small)


def test_pipeline_stages_can_be_recut_at_load(single_pe):
    """A blockwise single-PE artifact run on 2 stages x 2 replicas of 1 PE (npu:0:0-3)."""
    root, want = single_pe("tiny-llama")
    staged = LLM(root, devices="npu:0:0-3", pipeline_parallel_size=2)
    assert (staged.engine.simulator.mesh.pp, staged.engine.simulator.mesh.dp) == (2, 2)
    assert_same_generation(want, staged)
    assert staged.engine.simulator.stats["transfers"] > 0


def test_load_time_settings_are_checked(single_pe, tmp_path, cache_dir):
    root, _ = single_pe("tiny-llama")
    with pytest.raises(ValueError, match=r"^data_parallel_size: .* = 1\*2\*1 = 2 does not match the 4 PEs"):
        LLM(root, devices="npu:0:0-3", pipeline_parallel_size=2, data_parallel_size=1)
    with pytest.raises(ValueError, match=r"^pipeline_parallel_size: must be between 1 and the 2 decoder layers"):
        LLM(root, devices="npu:0", pipeline_parallel_size=4)
    build(["model=tiny-llama", "buckets=tiny", "build.use_blockwise_compile=false"], tmp_path / "layerwise", cache_dir)
    with pytest.raises(ValueError, match=r"^pipeline_parallel_size: only blockwise artifacts can be re-staged"):
        LLM(tmp_path / "layerwise", devices="npu:0:0-1", pipeline_parallel_size=2)


# -- the real SmolLM2-135M-Instruct: 9 query heads, so tp stays 1; stages and replicas -------


@pytest.mark.slow
def test_smollm2_on_uneven_stages_and_replicas_matches_the_single_pe_artifact(smollm2_artifact, tmp_path, cache_dir):
    single = LLM(smollm2_artifact)
    text = single.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True)  # fmt: skip
    prompts = [single.tokenizer.encode(text, add_special_tokens=False), [1, 504, 3458, 314, 260, 1345]]
    want = greedy_together(single, prompts, 3)
    build([f"{DEVICES}=npu:0:0-2", f"{PP}=3", "parallel.num_blocks_per_pp_stage=[8,12,10]"], tmp_path / "pp3", cache_dir)
    assert_same_generation(want, LLM(tmp_path / "pp3"), prompts, 3)
    replicas = LLM(smollm2_artifact, devices="npu:0:0-3", pipeline_parallel_size=2)  # 2 stages x 2 replicas
    assert replicas.engine.simulator.mesh.dp == 2
    assert_same_generation(want, replicas, prompts, 3)
