"""The MLflow model registry: registered versions, their lineage and metrics, the champion rule and its lock.

A trained model is registered once per MLflow run (register_once) and its version tagged with the run's lineage
and its evaluation (tag_version, one tag per metric). Promotion: a version gets the alias `champion` only if it
beats the current champion under the champion rule (config.ChampionRule: metric by name, direction, minimum
margin) on a metric both were evaluated on; otherwise it gets `challenger`. The dethroned version gets
`previous-champion`, which `flexi-jest rollback` restores. Promotions of one model take turns (registry_lock).
The MLflow connection (its URI, bounded retries) is tracking's: tracking.connect() and tracking.mlflow_client().
"""

import math
import time
from contextlib import contextmanager
from typing import Iterator

from pydantic import BaseModel

from flexi_jest import tracking
from flexi_jest.config import EvaluateResult

LEARNER_MODEL = "flexi-jest-learner"
REFERENCE_MODEL = "flexi-jest-reference"
LEGACY_METRIC_TAG = "eval_metric"  # "<metric>=<value>": read only, on versions promoted before 8453f28


def tag_version(model_name: str, version: str, run_id: str, metrics: dict[str, float]) -> dict[str, str]:
    """Lineage on a registered version: the run's `lineage.*` tags and the eval metrics by name (eval.<name>)."""
    client = tracking.mlflow_client()
    run_tags = client.get_run(run_id).data.tags
    tags = {k: v for k, v in run_tags.items() if k.startswith(tracking.LINEAGE_PREFIX)}
    tags.update({f"eval.{name}": str(value) for name, value in metrics.items()})
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return tags


def register_once(model_name: str, run_id: str) -> str:
    """The registry version of runs:/<run_id>/model under model_name, registered now if it is not yet: a stage
    KFP took from its cache hands over the same run, which must not become a second version."""
    mlflow = tracking.connect()
    existing = mlflow.MlflowClient().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if existing:
        return str(min(int(v.version) for v in existing))
    return str(mlflow.register_model(f"runs:/{run_id}/model", model_name).version)


METRIC_VALUE_TAG = "flexi_jest.metric."  # + metric name: the version's evaluation, one tag per metric
PROMOTION_TAG = "flexi_jest.promotion"  # the decision on this version, in words
CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous-champion"


class PromotionDecision(BaseModel):
    model_name: str
    version: str
    metric: str
    value: float | None
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    alias: str  # champion, challenger, or "" (refused: a metric that is not finite)
    reason: str


def version_metrics(version) -> dict[str, float]:
    """The evaluation metrics a registered version was tagged with (metric name -> value)."""
    metrics = {key[len(METRIC_VALUE_TAG):]: float(value) for key, value in version.tags.items()
               if key.startswith(METRIC_VALUE_TAG)}
    # a version promoted before the per-metric tags has only the legacy tag: still read, or a champion of an older
    # registry could never be compared (and so never replaced)
    name, _, number = version.tags.get(LEGACY_METRIC_TAG, "").partition("=")
    if name and number and name not in metrics:
        metrics[name] = float(number)
    return metrics


def alias_holder(client, model_name: str, alias: str):
    """The version holding alias, or None."""
    import mlflow
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def lock_holder(client, name: str) -> tuple[str, float] | None:
    """(owner, since) of the lock registered model `name`, or None if nobody holds it."""
    import mlflow
    try:
        tags = client.get_registered_model(name).tags
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return tags.get("flexi_jest.lock_owner", ""), float(tags.get("flexi_jest.lock_since", "inf"))


@contextmanager
def registry_lock(model_name: str, timeout: float = 600.0, stale_after: float = 900.0) -> Iterator[None]:
    """Mutual exclusion between promotions of one model, held by creating the registered model
    `<model_name>.promotion-lock` (the registry's unique name: one creator wins, in the database's transaction)
    with this holder's token, and released by deleting it. Lock requests are sent at most once (tracking.at_most_once)
    and their outcome read back from the lock's owner tag. A lock older than stale_after seconds (a crashed
    holder) is broken."""
    import uuid

    import mlflow

    client = mlflow.MlflowClient()
    name, owner = f"{model_name}.promotion-lock", uuid.uuid4().hex
    deadline = time.time() + timeout
    while True:
        try:
            with tracking.at_most_once():
                client.create_registered_model(name, tags={"flexi_jest.lock_owner": owner,
                                                           "flexi_jest.lock_since": str(time.time())},
                                               description=f"held while a version of {model_name} is promoted")
            break
        except Exception:  # taken, or the answer was lost: the owner tag says which
            holder = lock_holder(client, name)
            if holder is not None and holder[0] == owner:
                break
            if holder is not None and time.time() - holder[1] > stale_after:
                with tracking.at_most_once():
                    client.delete_registered_model(name)
                continue
            if time.time() > deadline:
                raise TimeoutError(f"{name} is held by another promotion (since {holder[1] if holder else '?'}); "
                                   f"a crashed holder's lock is broken after {stale_after:.0f} s") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        for _ in range(20):
            holder = lock_holder(client, name)
            if holder is None or holder[0] != owner:
                break
            try:
                with tracking.at_most_once():
                    client.delete_registered_model(name)
            except Exception:  # checked again above
                time.sleep(0.5)


def crown(client, model_name: str, version: str, alias: str = CHAMPION) -> str | None:
    """Give version `alias`; the version that held it becomes `previous-champion` (alias and tag); a version
    holding both champion and challenger is not left behind. Returns the version that held it before."""
    old = alias_holder(client, model_name, alias)
    old_version = str(old.version) if old is not None else None
    if old_version == str(version):
        return old_version
    client.set_registered_model_alias(model_name, alias, version)  # the new holder first: never no champion
    if alias == CHAMPION:
        if old_version is not None:
            client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, old_version)
            client.set_model_version_tag(model_name, old_version, PREVIOUS_CHAMPION, f"until version {version}")
        challenger = alias_holder(client, model_name, CHALLENGER)
        if challenger is not None and str(challenger.version) == str(version):
            client.delete_registered_model_alias(model_name, CHALLENGER)
    return old_version


def champion_metric(result: EvaluateResult) -> tuple[str, float]:
    """The number promotion compares: the evaluation's champion metric (EvaluateConfig.champion_metric, e.g.
    imagenet-val.top1), else the headline metric (the first eval set's top-1, evaluate.champion)."""
    from flexi_jest.evaluate import champion

    if result.champion_metric is not None and result.champion_value is not None:
        return result.champion_metric, result.champion_value
    return champion(result)


def evaluation_metrics(result: EvaluateResult) -> dict[str, float]:
    """Every metric of an evaluation by name (<set>.<metric>), its champion metric (champion_metric) first."""
    name, value = champion_metric(result)
    metrics = {name: value}
    for split, split_metrics in result.splits.items():
        for key, number in split_metrics.model_dump().items():
            if isinstance(number, (int, float)) and not isinstance(number, bool) and key not in ("num_samples",
                                                                                                 "num_classes"):
                metrics.setdefault(f"{split}.{key}", float(number))
    return metrics


def promote(model_name: str, version: str, metrics: dict[str, float], rule=None,
            shortfalls: dict[str, int] | None = None) -> PromotionDecision:
    """Crown this version `champion` if it beats the current champion under the champion rule (config.ChampionRule:
    the metric by name, its direction, a minimum margin), else make it `challenger`. It is compared only on a
    metric the champion was also evaluated on: a champion without it keeps its title, and the reason is written
    to the version's tags (flexi_jest.promotion) and printed. Concurrent promotions of one model take turns
    (registry_lock), so two racing end with the better model as champion. shortfalls: per eval set, the samples
    its evaluation could not read; a metric of a set with a shortfall crowns nobody unless rule.allow_partial.
    A metric that is not finite (NaN, inf: a diverged model) is refused: no alias. A champion whose metric is not
    finite is replaced by any version with a finite one (NaN compares False with everything: it could never be
    beaten), and the reason says so."""
    from flexi_jest.config import ChampionRule

    rule = rule or ChampionRule()
    metric = rule.metric or next(iter(metrics), "")
    mlflow = tracking.connect()
    client = mlflow.MlflowClient()
    for name, number in metrics.items():
        client.set_model_version_tag(model_name, version, f"{METRIC_VALUE_TAG}{name}", str(number))
    value = metrics.get(metric)
    with registry_lock(model_name):
        champion = alias_holder(client, model_name, CHAMPION)
        champion_value = None
        missing = (shortfalls or {}).get(metric.rsplit(".", 1)[0], 0)
        refused = False  # a version whose metric is not a number gets no alias at all
        if value is None:
            promoted = False
            reason = f"not crowned: version {version} has no metric {metric!r} (it has {sorted(metrics)})"
        elif not math.isfinite(value):
            promoted, refused = False, True
            reason = (f"refused: version {version}'s {metric} is {value}, not a finite number (a diverged model): "
                      "it is neither champion nor challenger")
        elif missing and not rule.allow_partial:
            promoted = False
            reason = (f"not crowned: {metric} = {value:.4f} was measured on a partial eval set ({missing} samples "
                      "unreadable; the promotion rule's allow_partial accepts that)")
        elif champion is None:
            promoted, reason = True, f"crowned: no champion yet ({metric} = {value:.4f})"
        elif str(champion.version) == str(version):
            promoted, reason = True, f"already champion ({metric} = {value:.4f})"
        else:
            champion_value = version_metrics(champion).get(metric)
            if champion_value is None:
                promoted = False
                reason = (f"not crowned: champion version {champion.version} has no metric {metric!r} to compare "
                          f"with (it has {sorted(version_metrics(champion))})")
            elif not math.isfinite(champion_value):  # nan > margin is False: such a champion could never be beaten
                promoted = True
                reason = (f"crowned: champion version {champion.version}'s {metric} is {champion_value}, not a finite "
                          f"number, so a finite {metric} ({value:.4f}) replaces it")
            else:
                gain = value - champion_value if rule.direction == "max" else champion_value - value
                promoted = gain > rule.min_margin
                verdict = "crowned" if promoted else "not crowned"
                reason = (f"{verdict}: {metric} {value:.4f} vs champion version {champion.version}'s "
                          f"{champion_value:.4f} ({rule.direction}, margin {rule.min_margin})")
        if promoted:
            crown(client, model_name, version)
        elif not refused and (champion is None or str(champion.version) != str(version)):
            client.set_registered_model_alias(model_name, CHALLENGER, version)
        client.set_model_version_tag(model_name, version, PROMOTION_TAG, reason)
    print(f"[promote] {model_name} version {version}: {reason}", flush=True)
    return PromotionDecision(model_name=model_name, version=str(version), metric=metric, value=value,
                             champion_version=str(champion.version) if champion is not None else None,
                             champion_value=champion_value, promoted=promoted,
                             alias=CHAMPION if promoted else "" if refused else CHALLENGER, reason=reason)


def promote_learner(learner_run_id: str, metrics: dict[str, float], rule, shortfalls: dict[str, int],
                    pipeline_run: str = "", experiment: str = tracking.DEFAULT_EXPERIMENT,
                    reference_run_id: str | None = None) -> PromotionDecision:
    """The promotion stage's registry work: register the learner (and the reference) once each, tag the versions
    with their lineage (and the learner's metrics), promote the learner under rule (a config.ChampionRule;
    shortfalls: per eval set, the samples its evaluation could not read), and log the decision as a `promote`
    run (nested under pipeline_run when given), whose parent run records the versions for a later rerun."""
    mlflow = tracking.connect()
    learner_version = register_once(LEARNER_MODEL, learner_run_id)
    tag_version(LEARNER_MODEL, str(learner_version), learner_run_id, metrics)
    decision = promote(LEARNER_MODEL, str(learner_version), metrics, rule, shortfalls)
    value = decision.value
    reference_version = None
    if reference_run_id:
        reference_version = register_once(REFERENCE_MODEL, reference_run_id)
        tag_version(REFERENCE_MODEL, str(reference_version), reference_run_id, {})
    tags = {"flexi_jest.stage": "promote", **tracking.parent_tags(pipeline_run)}
    with tracking.tracked_run("promote", tags, experiment):
        mlflow.log_dict(decision.model_dump(), "decision.json")
        mlflow.log_metrics(tracking.numeric_metrics({"promoted": float(decision.promoted), "candidate_metric": value,
                                                     "champion_metric": decision.champion_value}))  # finite ones
        mlflow.set_tags({"decision": decision.alias or "refused", "learner_version": str(learner_version),
                         "reference_version": str(reference_version), "reason": decision.reason,
                         "metric": decision.metric})
    if pipeline_run:  # what a later single-stage rerun of this run resolves (tracking.recorded_outputs)
        parent = tracking.pipeline_run_or_fail(pipeline_run).info.run_id
        client = mlflow.MlflowClient()
        client.set_tag(parent, f"{tracking.OUTPUT_TAG}learner_version", str(learner_version))
        if reference_version is not None:
            client.set_tag(parent, f"{tracking.OUTPUT_TAG}reference_version", str(reference_version))
    return decision


def registered_version(client, model_name: str, version: str):
    """The registered version, or LookupError (one line) if the model or the version does not exist."""
    import mlflow
    try:
        return client.get_model_version(model_name, str(version))
    except mlflow.exceptions.MlflowException:
        raise LookupError(f"{model_name} has no version {version} at {tracking.tracking_uri()}") from None


def promote_by_hand(model_name: str, version: str, alias: str = CHAMPION) -> str | None:
    """`flexi-jest promote`: give version `alias` (a person's decision, no rule applied); for `champion` the
    version that held it becomes `previous-champion`. Returns the version that held the alias."""
    tracking.check_reachable()
    client = tracking.mlflow_client()
    registered_version(client, model_name, version)
    with registry_lock(model_name):
        old = crown(client, model_name, str(version), alias)
        client.set_model_version_tag(model_name, str(version), PROMOTION_TAG, f"{alias} by hand (flexi-jest promote)")
    return old


def rollback(model_name: str) -> tuple[str, str]:
    """`flexi-jest rollback`: `champion` back to the `previous-champion` version, which the current champion
    becomes (a second rollback undoes the first). Returns (new champion, old champion)."""
    tracking.check_reachable()
    client = tracking.mlflow_client()
    with registry_lock(model_name):
        previous = alias_holder(client, model_name, PREVIOUS_CHAMPION)
        if previous is None:
            raise LookupError(f"{model_name} has no version with alias {PREVIOUS_CHAMPION!r} to roll back to "
                              f"at {tracking.tracking_uri()}")
        old = crown(client, model_name, str(previous.version))
        client.set_model_version_tag(model_name, str(previous.version), PROMOTION_TAG,
                                     f"champion again by rollback from version {old}")
    return str(previous.version), str(old)
