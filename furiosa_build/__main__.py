"""``python -m furiosa_build [overrides]``: build an artifact from the Hydra config in ``conf/``.

    python -m furiosa_build                                   # the default model and buckets
    python -m furiosa_build model=tiny-llama buckets=tiny build.dry_run=true
    python -m furiosa_build -m model=tiny-llama,tiny-gpt2 buckets=tiny   # one artifact per job

Before Hydra runs anything, ``main`` composes and validates every job of the command
(every point of a ``-m`` sweep), so a typo or an unsupported option ends with one line
``error: ...`` on stderr and exit status 2, with no traceback and nothing written.  Then
Hydra takes over as usual (``@hydra.main``), so launcher and sweeper plugins still work.

In a sweep, a job without an explicit ``build.save_dir`` writes to
``artifacts/<model.name>/<its overrides>`` so that jobs never share a directory.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from furiosa_build.config import USER_ERRORS, BuildSpec, ConfigError, allowed_keys, load_spec

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONFIG_NAME = "config"


class UsageError(Exception):
    """A command line that cannot run; the message is one line for ``error: ...``."""


# --------------------------------------------------------------------------- running a spec


def run(spec: BuildSpec) -> int:
    """Build (or with ``build.dry_run`` only plan) one artifact; return the exit status.

    User errors (``USER_ERRORS``) are printed as ``error: <one line>`` and give 2.
    """
    from furiosa_build.builder import ArtifactBuilder

    try:
        builder = ArtifactBuilder.from_spec(spec)
        if spec.build.dry_run:
            print(builder.plan().render())
        else:
            builder.build_from_spec()
    except USER_ERRORS as exc:
        report_error(exc)
        return 2
    return 0


def report_error(exc: BaseException | str) -> None:
    """Print ``error: <message>`` as a single line on stderr."""
    message = " ".join(str(exc).split("\n")).strip()
    print(f"error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- sweep job placement


def job_dir_name(override_dirname: str, job_num: int) -> str:
    """A directory name for one sweep job, made from its overrides (``job<N>`` if it has none)."""
    slug = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", override_dirname).strip("_")
    if len(slug) > 120:
        slug = f"{slug[:100]}_{hashlib.sha256(slug.encode()).hexdigest()[:12]}"
    return slug or f"job{job_num}"


def place_sweep_job(data: dict[str, Any], override_dirname: str, job_num: int) -> None:
    """Give a sweep job its own default save_dir: ``artifacts/<model.name>/<overrides>``."""
    build = data.setdefault("build", {})
    name = (data.get("model") or {}).get("name")
    if isinstance(build, dict) and build.get("save_dir") is None and isinstance(name, str):
        build["save_dir"] = f"{BuildSpec.DEFAULT_ARTIFACTS_DIR}/{name}/{job_dir_name(override_dirname, job_num)}"


# --------------------------------------------------------------------------- pre-validation


def _parse_overrides(overrides: Sequence[str]) -> list[Override]:
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as exc:
            lines = [line for line in str(exc).splitlines() if line and not line.startswith("See https")]
            detail = lines[-1] if lines else "syntax error"
            raise UsageError(f"bad override {text!r}: {detail}") from None
    return parsed


def _job_overrides(overrides: list[str], multirun: bool, compose_base) -> list[list[str]]:
    """The override list of every job the command line asks for (one job without ``-m``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = _parse_overrides(overrides)
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if not multirun:
        if sweeps:
            raise UsageError(f"{sweeps[0]!r} is a sweep; add -m (--multirun) to build one artifact per value, "
                             "or write a list as key=[a,b] and a string as key='a,b'")
        return [list(overrides)]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    params = compose_base(fixed).hydra.sweeper.get("params") or {}
    from_config = [f"{key}={value}" for key, value in params.items()]
    return BasicSweeper.split_arguments(_parse_overrides(from_config + list(overrides)), None)[0]


def _job_spec(cfg: DictConfig, multirun: bool, job_num: int) -> BuildSpec:
    """Validate one composed job exactly as the Hydra task function will."""
    with open_dict(cfg):
        cfg.hydra.job.num = job_num
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} interpolations resolve
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    if multirun:
        place_sweep_job(data, cfg.hydra.job.override_dirname, job_num)
    return load_spec(data)


def prevalidate(overrides: list[str], multirun: bool = False, config_name: str = CONFIG_NAME,
                extra_config_dir: Path | None = None) -> list[BuildSpec]:
    """Compose and validate every job; raise UsageError with one line for the first bad one.

    ``extra_config_dir`` is Hydra's ``--config-dir``: one more place to look for configs.
    """
    from hydra import compose, initialize_config_dir

    search = [f"hydra.searchpath=[file://{extra_config_dir}]"] if extra_config_dir else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def compose_job(job: list[str]) -> DictConfig:
            return compose(config_name, overrides=[*job, *search], return_hydra_config=True)

        jobs = _with_one_line(lambda: _job_overrides(overrides, multirun, compose_job), None)
        specs = []
        for num, job in enumerate(jobs):
            where = f"job {num} ({' '.join(job) or 'no overrides'}): " if multirun and len(jobs) > 1 else ""
            specs.append(_with_one_line(lambda: _job_spec(compose_job(job), multirun, num), where))
    _check_distinct_save_dirs(specs)
    return specs


def _check_distinct_save_dirs(specs: list[BuildSpec]) -> None:
    seen: dict[str, int] = {}
    for num, spec in enumerate(specs):
        save_dir = str(spec.build.save_dir)
        if save_dir in seen:
            raise UsageError(f"build.save_dir: sweep jobs {seen[save_dir]} and {num} would both write to "
                             f"{save_dir!r}; leave build.save_dir unset in sweeps (each job then gets "
                             "artifacts/<model.name>/<its overrides>)")
        seen[save_dir] = num


def _with_one_line(action, where: str | None):
    """Run ``action``; turn configuration errors into a one-line UsageError."""
    try:
        return action()
    except UsageError as exc:
        raise UsageError(f"{where or ''}{exc}") from None
    except (*USER_ERRORS, HydraException, OmegaConfBaseException) as exc:
        raise UsageError(f"{where or ''}{one_line(exc)}") from None


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf/config error as one line naming the key or group at fault."""
    if isinstance(exc, (ConfigError, *USER_ERRORS)):
        return str(exc)
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        return f"{group}: unknown option {option!r}; available: {', '.join(exc.options)}"
    cause = exc.__cause__
    full_key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    if full_key and "not in struct" in f"{cause}{exc}":
        path = tuple(str(full_key).split("."))
        allowed = allowed_keys(path[:-1])
        if allowed is not None:
            return f"{full_key}: unknown key; allowed: {', '.join(allowed)}"
        return f"{full_key}: unknown key (to add a new key write +{full_key}=VALUE)"
    first = _first_line(exc)
    if full_key:
        first = f"{full_key}: {first}"
    if cause is not None and not isinstance(cause, (ConfigError, *USER_ERRORS)):
        first = f"{first}: {_first_line(cause)}"
    return first


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------- entry points


# An absolute config path: "../conf" would be resolved as a package path ("pkg://conf") when this
# module is imported (console script, tests) rather than run as a file.
@hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")
def hydra_task(cfg: DictConfig) -> None:
    """Hydra's task function: config -> BuildSpec -> run (one call per sweep job)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        place_sweep_job(data, hydra_cfg.job.override_dirname, hydra_cfg.job.num)
    try:
        spec = load_spec(data)
    except USER_ERRORS as exc:
        report_error(exc)
        sys.exit(2)
    status = run(spec)
    if status:
        sys.exit(status)


def _hydra_args(argv: list[str]) -> Any:
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Validate the whole command line first, then let Hydra run the job(s)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _hydra_args(argv)
    informational = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    if not (informational or args.experimental_rerun or args.config_path):
        extra_dir = Path(args.config_dir).resolve() if args.config_dir else None
        try:
            prevalidate(args.overrides, args.multirun, args.config_name or CONFIG_NAME, extra_dir)
        except UsageError as exc:
            report_error(exc)
            sys.exit(2)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "furiosa_build", *argv]
    try:
        hydra_task()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
