"""One DAG per image template file: the build steps of DESIGN.md as tasks, in AIB's order.

Parsing is cheap and offline: templates are read and validated, nothing is downloaded and no VM is touched.
A task process builds only its own DAG (`get_parsing_context`). A template that fails validation becomes a
placeholder DAG carrying the errors, so one broken file never hides the other templates' DAGs.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, AssetWatcher, Param, TaskGroup, chain, get_parsing_context
from airflow.timetables.trigger import CronTriggerTimetable
from airflow.sdk.exceptions import AirflowFailException
from airflow.sdk.bases.operator import BaseOperator

from goldsmith import affinity, lineage
from goldsmith.azure.janitor import JANITOR_DAG_ID, janitor_dag
from goldsmith.operators import steps as ops
from goldsmith.secrets import strip_secrets
from goldsmith.settings import PROJECT_ROOT, goldsmith_home, templates_dir  # noqa: F401 (re-exported)
from goldsmith.template.loader import LoadedTemplate, TemplateError, load_template
from goldsmith.triggers import SourceVersionTrigger
from goldsmith.template.plan import backend_problems, customize_steps, distribute_steps, validate_steps

BUILD_VM_POOL = affinity.BUILD_VM_POOL
START_DATE = datetime(2024, 1, 1)
_DAG_ID = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")


def build_dags(folder: Path | None = None) -> dict[str, DAG]:
    folder = folder or templates_dir()
    wanted = get_parsing_context().dag_id
    assets: dict[str, Asset] = {}
    dags = {}
    for path in sorted(folder.glob("*.json")):
        dag_id = dag_id_for(path)
        if wanted and dag_id != wanted:
            continue
        dags[dag_id] = make_dag(path, assets)
    # Azure builds get a janitor for the staging resources a build could not clean up itself.
    if wanted == JANITOR_DAG_ID or (not wanted and any("backend:azure" in d.tags for d in dags.values())):
        dags[JANITOR_DAG_ID] = janitor_dag(folder, START_DATE)
    return dags


def dag_id_for(path: Path) -> str:
    """The template's name if it can be a DAG id of its own, else a placeholder id no other file can take:
    `a b.json` and `a+b.json` must not both become `a_b` (nor replace `a_b.json`'s DAG)."""
    if _name_problem(path.stem) is None:
        return path.stem
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:40]
    return f"invalid_{readable}_{hashlib.sha256(path.name.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


def _name_problem(stem: str) -> str | None:
    if stem == JANITOR_DAG_ID:
        return f"the name '{JANITOR_DAG_ID}' is Goldsmith's janitor DAG: rename the file"
    if not _DAG_ID.match(stem) or stem.startswith("."):
        return "the file name is the DAG id: use only letters, digits, '_', '-', '.', not starting with '.'"
    if len(stem) > 64:  # AIB's limit on a template name, which staging names and tags carry
        return f"the file name (the template's name) is {len(stem)} characters: use at most 64"
    return None


def make_dag(path: Path, assets: dict[str, Asset] | None = None) -> DAG:
    if (problem := _name_problem(path.stem)) is not None:
        return invalid_template_dag(path, [f"{path}: {problem}"])
    try:
        loaded = load_template(path)
        problems = backend_problems(loaded)
        if problems:
            raise TemplateError(path, problems)
        place = affinity.placement(loaded.name, loaded.options.backend)
        return build_dag(loaded, {} if assets is None else assets, place)
    except TemplateError as e:
        return invalid_template_dag(path, [_for_dag(line) for line in str(e).splitlines()])
    except affinity.AffinityError as e:
        return invalid_template_dag(path, [str(e)])
    except Exception as e:  # noqa: BLE001 — whatever one file does, the other templates' DAGs stay
        return invalid_template_dag(path, [f"{path}: Goldsmith could not make this DAG ({type(e).__name__}: "
                                           f"{strip_secrets(str(e))[:500]}); please report it with the template"])


def _for_dag(line: str) -> str:
    """A DAG gets no --set: the fix for an unresolved value is in the file."""
    return re.sub(r": pass --set (\S+)=VALUE$", r": give <\1> a value in the template (a DAG takes no --set)", line)


class InvalidTemplateOperator(BaseOperator):
    ui_color = "#f4cccc"

    def __init__(self, *, problems: list[str], **kwargs):
        super().__init__(**kwargs)
        self.problems = problems

    def execute(self, context):
        raise AirflowFailException("the template is invalid:\n" + "\n".join(self.problems))


def invalid_template_dag(path: Path, problems: list[str]) -> DAG:
    with DAG(
        dag_id_for(path),
        description=f"INVALID TEMPLATE: {problems[0]}"[:1000],
        doc_md="### Invalid template\n\nFix these and the build DAG comes back:\n\n"
        + "\n".join(f"- `{p}`" for p in problems),
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        tags=["goldsmith", "invalid-template"],
    ) as dag:
        InvalidTemplateOperator(task_id="invalid_template", problems=problems, retries=0)
    return dag


def build_dag(loaded: LoadedTemplate, assets: dict[str, Asset], place: affinity.Placement) -> DAG:
    t, o = loaded.template, loaded.options
    timeout = timedelta(minutes=t.properties.buildTimeoutInMinutes or 240)
    validation = t.properties.validate_
    source_only = bool(validation and validation.sourceValidationOnly)
    common = {"template_file": str(loaded.path)}
    vm_task = {**common, "pool": place.pool}
    with DAG(
        loaded.name,
        description=o.description or _describe(loaded),
        doc_md=_doc_md(loaded),
        schedule=schedule(loaded, assets),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=sorted({"goldsmith", f"backend:{o.backend}", f"source:{t.properties.source.type}", *o.tags}),
        default_args={
            "owner": o.owner,
            "retries": o.retries,
            "retry_delay": timedelta(seconds=o.retryDelaySeconds),
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": timedelta(minutes=10),
            "execution_timeout": timeout,
            "queue": place.queue,  # every task of a local build on the host that holds its VM (affinity.py)
        },
        params={
            "galleryImageVersion": Param(
                None, type=["null", "string"], pattern=r"^\d+\.\d+\.\d+$",
                title="Gallery image version", description="Publish SharedImage targets as this version (x.y.z) "
                "instead of the template's versioning.",
            ),
            "forceRebuild": Param(
                False, type="boolean", title="Force rebuild",
                description="Build even if the source, the template and its scripts are unchanged since the "
                "last successful build (otherwise such a run is skipped).",
            ),
            "onCustomizerError": Param(
                (t.properties.errorHandling.onCustomizerError if t.properties.errorHandling else "cleanup"),
                enum=["cleanup", "abort"], title="On customizer error",
                description="abort keeps the build VM running for debugging; cleanup removes it.",
            ),
        },
        render_template_as_native_obj=True,
    ) as dag:
        plan = ops.PlanOperator(task_id="plan", **common)
        prepare = ops.PrepareStagingOperator(task_id="prepare_staging", **common)
        provision = ops.ProvisionOperator(task_id="provision", **vm_task)
        cleanup = ops.CleanupStagingOperator(task_id="cleanup_staging", **common)

        customize, validate = [], []
        if customize_steps(t) and not source_only:
            with TaskGroup("customize", tooltip="the template's customizers, in order"):
                customize = [ops.CustomizeOperator(task_id=s.local_id, index=s.index, **vm_task)
                             for s in customize_steps(t)]
        if validate_steps(t):
            with TaskGroup("validate", tooltip="in-VM validations, in order"):
                validate = [ops.ValidateOperator(task_id=s.local_id, index=s.index, **vm_task)
                            for s in validate_steps(t)]
        chain(plan, prepare, provision, *customize, *validate)
        if source_only:  # AIB validates the source image itself: nothing is built or distributed
            chain(validate[-1] if validate else provision, cleanup)
        else:
            generalize = ops.GeneralizeOperator(task_id="generalize", **vm_task)
            if validation and validation.continueDistributeOnFailure:
                # Distribute even when a validator failed; the run is still reported failed, as in AIB.
                generalize.trigger_rule = "all_done"
            capture = ops.CaptureOperator(task_id="capture", **common)
            with TaskGroup("distribute"):
                distribute = [
                    ops.DistributeOperator(task_id=s.local_id, run_output_name=s.name,
                                           outlets=[image_asset(lineage.target_uri(s.item, loaded.name), assets)],
                                           **common)
                    for s in distribute_steps(t)
                ]
            chain((validate or customize or [provision])[-1], generalize, capture, distribute)
            chain(distribute, cleanup)
        if o.backend == "local":
            # A step whose cached layer the build started from is skipped (goldsmith.local.layers); the steps
            # after it still run, and a run skipped at `plan` still skips them all through provision.
            for task in [*customize, *validate, *([] if source_only else [generalize])]:
                if task.trigger_rule == "all_success":
                    task.trigger_rule = "none_failed_min_one_success"
                    provision >> task
        # A teardown runs whatever failed upstream and does not decide the run's state.
        cleanup.as_teardown(setups=prepare)
    return dag


def image_asset(uri: str, assets: dict[str, Asset]) -> Asset:
    """The one Asset object for an image among the DAGs built together (`assets`, by URI).

    Airflow keeps one definition of an asset, from whichever DAG of the file it reads last (in no set order),
    so the producer's outlet must carry the watchers a consumer's schedule adds: one shared object does.
    """
    if uri not in assets:
        assets[uri] = Asset(name=uri, uri=uri, group="image")
    return assets[uri]


def schedule(loaded: LoadedTemplate, assets: dict[str, Asset]):
    """The cron schedule, the source image's asset ("whenever the base changes"), or both."""
    t, o = loaded.template, loaded.options
    if not lineage.follows_source(t, o):
        return o.schedule
    source = t.properties.source
    asset = image_asset(lineage.source_uri(source), assets)
    if o.sourceTrigger:  # versions published outside Goldsmith: poll for them, as AIB's SourceImage trigger does
        trigger = SourceVersionTrigger.for_template(loaded, goldsmith_home())
        asset.watchers.append(AssetWatcher(name=f"{loaded.name}-source", trigger=trigger))
    if o.schedule:
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(o.schedule, timezone="UTC"), assets=asset)
    return asset


def _describe(loaded: LoadedTemplate) -> str:
    t = loaded.template.properties
    targets = ", ".join(f"{d.type} {d.runOutputName}" for d in t.distribute)
    return f"Image from {_source_label(loaded)} with {len(t.customize)} customizer(s) to {targets}"


def _source_label(loaded: LoadedTemplate) -> str:
    s = loaded.template.properties.source
    if s.type == "PlatformImage":
        return f"{s.publisher}:{s.offer}:{s.sku}:{s.version}"
    return getattr(s, "imageId", None) or getattr(s, "imageVersionId", "")


def _doc_md(loaded: LoadedTemplate) -> str:
    t = loaded.template.properties
    lines = [
        f"## Image template `{loaded.name}`",
        f"File: `{loaded.path}`  ·  backend: **{loaded.options.backend}**  ·  build timeout: "
        f"{t.buildTimeoutInMinutes or 240} min",
        "",
        f"**Source** ({t.source.type}): `{_source_label(loaded)}`",
        "",
        "**Customizers**",
        *[f"{i}. {c.type} `{c.name or ''}`" for i, c in enumerate(t.customize)],
        "",
        "**Distribution**",
        *[f"- {d.type} `{d.runOutputName}`: `{getattr(d, 'imageId', None) or getattr(d, 'galleryImageId', None) or getattr(d, 'uri', None) or 'staging storage'}`" for d in t.distribute],
    ]
    return strip_secrets("\n".join(lines))
