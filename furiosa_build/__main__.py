"""``python -m furiosa_build [overrides]``: build an artifact from the Hydra config in ``conf/``.

The configs ship in the package (``furiosa_build.conf``, a link to ``conf/``) and Hydra
finds them as ``pkg://furiosa_build.conf``, so an installed wheel works from any folder.
Hydra knows the BuildSpec schema (``furiosa_build.hydra_schema``), so every key can be
overridden and completed; ``--config-dir DIR`` adds a folder of the user's own configs
(a primary config for ``--config-name``, or more group options) and is validated up front
like the default.

    python -m furiosa_build                                   # the default model and buckets
    python -m furiosa_build model=tiny-llama buckets=tiny build.dry_run=true
    python -m furiosa_build explain model=tiny-llama buckets=tiny     # why each program would compile
    python -m furiosa_build -m model=tiny-llama,tiny-gpt2 buckets=tiny   # one artifact per job

Before Hydra runs anything, ``main`` composes and validates every job of the command
(every point of a ``-m`` sweep) and checks its output paths, so a typo, an unsupported
option or an unwritable folder ends with one line ``error: ...`` on stderr and exit
status 2, with no traceback and nothing written.  Then Hydra takes over as usual
(``@hydra.main``), so launcher and sweeper plugins still work; the task function reports
the failures found later (a model whose config does not fit the buckets, a full disk) the
same way.  Ctrl-C ends with one line and status 130.

In a sweep, one job's failure never stops the others: an invalid job is named up front and
skipped, a job that fails while building is named when it fails, and the command ends with
one line listing every failed job and status 2.  Each job's composed config is kept beside
the artifacts, in ``<sweep dir>/configs/<job folder>.yaml``, with a record of its build (or
its error) that the sweep report ranks (``sweep_report.py``, a Hydra callback).

In a sweep, a job without an explicit ``build.save_dir`` writes to
``<hydra.sweep.dir>/<its overrides>``, i.e. ``artifacts/multirun/<date>_<time>/<overrides>``
(one timestamp per sweep), so that jobs never share a folder and never land inside the
folder of a single build (``artifacts/<model.name>``).  Overrides that do not change the
artifact (``NON_SEMANTIC_KEYS``: progress, cache, workers, backend, dry run) are left out
of the folder name.

With the default buckets config (``buckets`` and ``buckets.decode`` not chosen on the
command line), an encoder (``model.task`` ``embed`` or resolved to it from ``auto``)
drops the default decode buckets and keeps the prefill ones; decode buckets given by the
user are refused for an encoder with the hint ``model.task=embed buckets=embed``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from furiosa_build.config import (
    USER_ERRORS,
    BuildSpec,
    ConfigError,
    allowed_keys,
    load_spec,
)
from furiosa_build.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, io_error, path_error
from furiosa_build.hydra_schema import config_data, register_configs
from furiosa_build.output_paths import check_creatable, check_output_paths
from furiosa_build.scratch import atomic_write
from furiosa_build.sweep_report import write_job_record

if TYPE_CHECKING:
    from furiosa_build.builder import BuildReport

CONFIG_PATH = "pkg://furiosa_build.conf"  # conf/, shipped in the package
CONFIG_NAME = "config"
DEFAULT_BUCKETS = "default"  # the buckets option conf/config.yaml picks

#: Overrides that change how a build runs, not what it builds: left out of sweep folder names.
NON_SEMANTIC_KEYS = frozenset({
    "build.progress", "build.cache_dir", "build.num_pipeline_builder_workers", "build.num_compile_workers",
    "build.backend", "build.dry_run", "build.shared_cache", "build.explain",
    "build.cluster.address", "build.cluster.num_workers", "build.cluster.retries",
    "sweep.workload", "sweep.num_prompts",
})  # fmt: skip


class UsageError(Exception):
    """A command line that cannot run; the message is one line for ``error: ...``."""


# --------------------------------------------------------------------------- running a spec


def run(spec: BuildSpec, on_built: Callable[[BuildReport], None] | None = None) -> int:
    """Build (or with ``build.dry_run`` only plan) one artifact; return the exit status.
    ``on_built`` receives the report of a build that finished (a sweep job's record).

    User errors (``USER_ERRORS``) and any OSError (a full disk, a read-only or unwritable
    folder...) are printed as ``error: <one line>`` and give 2; Ctrl-C gives 130.
    """
    doing = f"{'planning' if spec.build.dry_run or spec.build.explain else 'building'} {spec.build.save_dir}"
    try:
        check_output_paths(spec)
        from furiosa_build.builder import ArtifactBuilder

        builder = ArtifactBuilder.from_spec(spec)
        if spec.build.explain:
            print(builder.explain().render())
        elif spec.build.dry_run:
            print(builder.plan().render())
        else:
            report = builder.build_from_spec()
            if on_built is not None:
                on_built(report)
    except USER_ERRORS as exc:
        report_error(exc)
        return EXIT_USER_ERROR
    except OSError as exc:
        report_error(io_error(exc, doing))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        report_error(f"interrupted while {doing}")
        return EXIT_INTERRUPTED
    return 0


def report_error(exc: BaseException | str) -> None:
    """Print ``error: <message>`` as a single line on stderr."""
    message = " ".join(str(exc).split("\n")).strip()
    ERROR_LINES.append(message)
    print(f"error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- sweep job placement


def _override_key(override: str) -> str:
    """``+build.x=1`` -> ``build.x``; ``~model.pooling`` -> ``model.pooling``."""
    return override.lstrip("~+").partition("=")[0].strip()


def override_dirname(overrides: Sequence[str]) -> str:
    """Hydra's ``override_dirname`` of a job (its overrides, sorted, comma-joined), without
    the overrides in NON_SEMANTIC_KEYS."""
    return ",".join(sorted(o for o in overrides if _override_key(o) not in NON_SEMANTIC_KEYS))


def job_dir_name(override_dirname: str, job_num: int) -> str:
    """A directory name for one sweep job, made from its overrides (``job<N>`` if it has none)."""
    slug = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", override_dirname).strip("_")
    if len(slug) > 120:
        slug = f"{slug[:100]}_{hashlib.sha256(slug.encode()).hexdigest()[:12]}"
    return slug or f"job{job_num}"


def place_sweep_job(data: dict[str, Any], overrides: Sequence[str], job_num: int, sweep_dir: str) -> None:
    """Give a sweep job its own default save_dir: ``<sweep_dir>/<its overrides>``."""
    build = data.setdefault("build", {})
    if isinstance(build, dict) and build.get("save_dir") is None:
        build["save_dir"] = f"{sweep_dir}/{job_dir_name(override_dirname(overrides), job_num)}"


def decode_buckets_are_defaults(choices: Any, overrides: Sequence[str]) -> bool:
    """True when ``buckets.decode`` comes from the default buckets config, not from the user."""
    touched = {_override_key(o) for o in overrides}
    return choices.get("buckets") == DEFAULT_BUCKETS and not touched & {"buckets", "buckets.decode"}


def _spec_of_job(cfg: DictConfig, hydra_cfg: Any) -> BuildSpec:
    """The BuildSpec of one composed job (``hydra_cfg``: its ``hydra`` section)."""
    data = config_data(cfg)
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        place_sweep_job(data, overrides, hydra_cfg.job.num, str(hydra_cfg.sweep.dir))
    return load_spec(data, decode_buckets_are_defaults=decode_buckets_are_defaults(hydra_cfg.runtime.choices, overrides))


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


def _job_spec(cfg: DictConfig, multirun: bool, job_num: int, sweep_dir: list[str]) -> BuildSpec:
    """Validate one composed job exactly as the Hydra task function will, and its output paths.

    ``sweep_dir`` holds the sweep folder once the first job resolved it: Hydra stamps it
    once per sweep, so every job of this validation must see the same one.
    """
    with open_dict(cfg):
        cfg.hydra.job.num = job_num
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        if multirun and sweep_dir:
            cfg.hydra.sweep.dir = sweep_dir[0]
    HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} interpolations resolve
    if multirun and not sweep_dir:  # Hydra creates the sweep folder before the first job runs
        sweep_dir.append(str(cfg.hydra.sweep.dir))
        check_creatable("hydra.sweep.dir", Path(sweep_dir[0]), Path(sweep_dir[0]))
    spec = _spec_of_job(cfg, cfg.hydra)
    check_output_paths(spec)
    return spec


@contextlib.contextmanager
def _hydra_searching(config_path: str, extra_config_dir: Path | None) -> Iterator[None]:
    """Hydra initialised for ``compose`` with the search path ``@hydra.main`` builds: the
    primary ``config_path`` (a folder or ``pkg://`` module), then ``--config-dir``."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_automatic_config_search_path(None, None, config_path)
    if extra_config_dir is not None:  # where and how hydra._internal.utils.run_hydra adds it
        search_path.prepend("command-line", f"file://{extra_config_dir}", anchor=SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name="furiosa_build", config_search_path=search_path)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


def prevalidate(overrides: list[str], multirun: bool = False, config_name: str = CONFIG_NAME,
                extra_config_dir: Path | None = None, config_path: str = CONFIG_PATH) -> list[BuildSpec]:
    """Compose and validate every job; raise UsageError with one line for the first bad one.

    ``extra_config_dir`` is Hydra's ``--config-dir``: one more place to look for configs
    (the primary config ``config_name`` among them); ``config_path`` the primary config
    folder or module (``--config-path``).
    """
    from hydra import compose

    with _hydra_searching(config_path, extra_config_dir):
        def compose_job(job: list[str]) -> DictConfig:
            return compose(config_name, overrides=job, return_hydra_config=True)

        jobs = _with_one_line(lambda: _job_overrides(overrides, multirun, compose_job), None)
        specs: list[BuildSpec] = []
        errors: list[UsageError] = []
        sweep_dir: list[str] = []
        INVALID_JOBS.clear()
        for num, job in enumerate(jobs):
            label = f"job {num} ({' '.join(job) or 'no overrides'})"
            where = f"{label}: " if multirun and len(jobs) > 1 else ""
            try:
                specs.append(_with_one_line(lambda: _job_spec(compose_job(job), multirun, num, sweep_dir), where))
            except UsageError as exc:
                errors.append(exc)
                INVALID_JOBS[num] = label
                JOB_ERRORS[num] = str(exc).removeprefix(where)
    if errors and (not multirun or not specs):
        raise errors[0]
    for error in errors:  # a sweep runs its valid jobs; the invalid ones are named now and at the end
        report_error(f"{error}; the sweep's other jobs still run")
    _check_distinct_save_dirs(specs)
    return specs


def _artifact_of(spec: BuildSpec) -> dict[str, Any]:
    """What a spec builds: everything but the NON_SEMANTIC_KEYS (how the build runs)."""
    data = spec.model_dump()
    for key in NON_SEMANTIC_KEYS:
        *path, leaf = key.split(".")
        section = data
        for part in path:
            section = section.get(part, {})
        section.pop(leaf, None)
    return data


def _check_distinct_save_dirs(specs: list[BuildSpec]) -> None:
    """Two jobs may share a folder only if they build the same artifact (they differ in
    NON_SEMANTIC_KEYS alone, e.g. a sweep over build.num_compile_workers)."""
    seen: dict[str, int] = {}
    for num, spec in enumerate(specs):
        save_dir = str(spec.build.save_dir)
        if save_dir in seen and _artifact_of(specs[seen[save_dir]]) != _artifact_of(spec):
            raise UsageError(f"build.save_dir: sweep jobs {seen[save_dir]} and {num} would both write to "
                             f"{save_dir!r}; leave build.save_dir unset in sweeps (each job then gets "
                             "artifacts/multirun/<date>_<time>/<its overrides>)")
        seen.setdefault(save_dir, num)


def _with_one_line(action, where: str | None):
    """Run ``action``; turn configuration errors into a one-line UsageError."""
    try:
        return action()
    except UsageError as exc:
        raise UsageError(f"{where or ''}{exc}") from None
    except (*USER_ERRORS, HydraException, OmegaConfBaseException) as exc:
        raise UsageError(f"{where or ''}{one_line(exc)}") from None
    except OSError as exc:  # reading a config file
        raise UsageError(f"{where or ''}{io_error(exc, 'reading the config')}") from None


#: OmegaConf's wording for a key that is neither in the YAML nor in the schema (a struct node or a dataclass).
_UNKNOWN_KEY = re.compile(r"not in struct|Key '[^']*' not in '")


def one_line(exc: BaseException) -> str:
    """A Hydra/OmegaConf/config error as one line naming the key or group at fault."""
    if isinstance(exc, (ConfigError, *USER_ERRORS)):
        return str(exc)
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        return f"{group}: unknown option {option!r}; available: {', '.join(exc.options)}"
    cause = exc.__cause__
    full_key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None) or _full_key_in(str(exc))
    if full_key and _UNKNOWN_KEY.search(f"{cause}{exc}"):
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


def _full_key_in(message: str) -> str | None:
    """The ``full_key:`` line OmegaConf writes into its messages, which Hydra quotes when a
    config file has a key the schema does not (the exception itself is not chained)."""
    found = re.search(r"^\s*full_key: (\S+)$", message, re.MULTILINE)
    return found[1] if found else None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------- entry points


#: The sweep jobs that failed in this process, as ``job <num> (<overrides>)``: a failed job is
#: reported and the sweep goes on; ``main`` exits with status 2 at the end if any failed.
FAILED_JOBS: list[str] = []
#: Sweep jobs that ``prevalidate`` found invalid (number -> label): reported there, not run.
INVALID_JOBS: dict[int, str] = {}
#: The one-line error of each failed sweep job (number -> message), for the sweep report.
JOB_ERRORS: dict[int, str] = {}
#: Every ``error:`` line this process printed, oldest first (a failed job's is the last).
ERROR_LINES: list[str] = []


register_configs()  # before any composition: conf/config.yaml starts from the schema


@hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")
def hydra_task(cfg: DictConfig) -> None:
    """Hydra's task function: config -> BuildSpec -> run (one call per sweep job).

    Every failure a user can cause ends here with one line.  A single build then exits
    (``sys.exit``: 2, or 130 for Ctrl-C; a SystemExit passes through Hydra's own error
    report, which would print a stack and exit with 1).  A sweep job is recorded in
    FAILED_JOBS and the sweep goes on to the next job; Ctrl-C still ends the sweep.
    """
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if sweep and hydra_cfg.job.num in INVALID_JOBS:
        FAILED_JOBS.append(INVALID_JOBS[hydra_cfg.job.num])
        _record_failed_job(hydra_cfg)
        return
    printed = len(ERROR_LINES)
    try:
        status = _run_job(cfg, hydra_cfg, sweep)
    except KeyboardInterrupt:
        report_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    if status and sweep:
        FAILED_JOBS.append(f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task) or 'no overrides'})")
        JOB_ERRORS[hydra_cfg.job.num] = ERROR_LINES[-1] if len(ERROR_LINES) > printed else f"exit status {status}"
        _record_failed_job(hydra_cfg)
    elif status:
        sys.exit(status)


def _run_job(cfg: DictConfig, hydra_cfg: Any, sweep: bool) -> int:
    """Validate and run one job; its status (0, or 2 after printing one line)."""
    try:
        spec = _spec_of_job(cfg, hydra_cfg)
    except USER_ERRORS as exc:
        report_error(exc)
        return EXIT_USER_ERROR
    except OSError as exc:  # reading the model's folder
        report_error(io_error(exc, "reading the config"))
        return EXIT_USER_ERROR
    if not sweep:
        return run(spec)
    _keep_job_config(cfg, hydra_cfg, spec)
    name, sweep_dir, job = Path(str(spec.build.save_dir)).name, str(hydra_cfg.sweep.dir), int(hydra_cfg.job.num)
    return run(spec, lambda report: write_job_record(sweep_dir, name, job, list(hydra_cfg.overrides.task), report=report))


def _record_failed_job(hydra_cfg: Any) -> None:
    """Leave a failed sweep job's error where the sweep report reads it."""
    overrides, job = list(hydra_cfg.overrides.task), int(hydra_cfg.job.num)
    name = job_dir_name(override_dirname(overrides), job)
    write_job_record(str(hydra_cfg.sweep.dir), name, job, overrides, error=JOB_ERRORS[job])


def _keep_job_config(cfg: DictConfig, hydra_cfg: Any, spec: BuildSpec) -> None:
    """Save a sweep job's composed config as ``<sweep dir>/configs/<its folder name>.yaml``,
    beside its artifact rather than inside it (an artifact holds only what its manifest lists)."""
    name = Path(str(spec.build.save_dir)).name
    target = Path(str(hydra_cfg.sweep.dir)) / "configs" / f"{name}.yaml"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, OmegaConf.to_yaml(cfg, resolve=True).encode())
    except OSError as exc:
        print(f"warning: {io_error(exc, 'saving the job config', target)}", file=sys.stderr)


def _hydra_args(argv: list[str]) -> Any:
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:  # argparse's usage block + message -> one line
        report_error(f"{' '.join(message.split())} (see python -m furiosa_build --help)")
        sys.exit(EXIT_USER_ERROR)

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args(argv)


def _primary_config_path(config_path: str | None) -> str | None:
    """The primary config location for ``prevalidate``: ours, an absolute folder or a
    ``pkg://`` module given with ``--config-path``; None for a relative path, which Hydra
    resolves against this module's folder itself."""
    if not config_path:
        return CONFIG_PATH
    if config_path.startswith("pkg://"):
        return config_path
    if not os.path.isabs(config_path):
        return None
    if not os.path.isdir(config_path):
        raise UsageError(str(path_error(errno.ENOTDIR, "--config-path", config_path, "is not a folder")))
    return config_path


def _extra_config_dir(config_dir: str | None) -> Path | None:
    """The folder ``--config-dir`` names, which must exist (as Hydra requires)."""
    if config_dir is None:
        return None
    if not os.path.isdir(config_dir):
        raise UsageError(str(path_error(errno.ENOTDIR, "--config-dir", config_dir, "is not a folder")))
    return Path(config_dir).resolve()


def main(argv: list[str] | None = None) -> None:
    """Validate the whole command line first, then let Hydra run the job(s)."""
    try:
        _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        report_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)


def _main(argv: list[str]) -> None:
    if argv[:1] == ["explain"]:  # `python -m furiosa_build explain [overrides]`: build.explain=true
        argv = [*argv[1:], "build.explain=true"]
    args = _hydra_args(argv)
    informational = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    if not (informational or args.experimental_rerun):
        try:
            extra_dir = _extra_config_dir(args.config_dir)
            config_path = _primary_config_path(args.config_path)
            if config_path is not None:
                prevalidate(args.overrides, args.multirun, args.config_name or CONFIG_NAME, extra_dir, config_path)
        except UsageError as exc:
            report_error(exc)
            sys.exit(EXIT_USER_ERROR)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "furiosa_build", *argv]
    FAILED_JOBS.clear()
    try:
        hydra_task()
    finally:
        sys.argv = saved
    if FAILED_JOBS:
        report_error(f"{len(FAILED_JOBS)} sweep job(s) failed: {'; '.join(FAILED_JOBS)}")
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
