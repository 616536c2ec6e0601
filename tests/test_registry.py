"""The model registry and promotion against an `mlflow server` whose backend store is a real PostgreSQL, as
k8s/base deploys it (tests/postgres_mlflow.py): the champion rule, one champion, racing promotions from two
processes, the promote and rollback commands."""

import os
import subprocess
import sys
import time

import pytest

from conftest import bare_version
from flexi_jest import registry, tracking

# PostgreSQL, an mlflow server on it and two promoter processes: about four minutes on the loaded 2-core machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory):
    from postgres_mlflow import mlflow_on_postgres
    with mlflow_on_postgres(tmp_path_factory.mktemp("registry")) as (url, database):
        yield url, database


@pytest.fixture
def registry_uri(registry_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_server[0])
    return registry_server[0]


def test_the_registry_lives_in_postgresql(registry_uri, registry_server):
    """What the server registers is in PostgreSQL's tables (no SQLite file anywhere in between)."""
    import psycopg2

    client = tracking.mlflow_client()
    bare_version(client, "where-am-i")
    connection = psycopg2.connect(registry_server[1].replace("+psycopg2", ""))
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT name FROM registered_models WHERE name = 'where-am-i'")
        assert cursor.fetchall() == [("where-am-i",)]
        cursor.execute("SHOW server_version")
        assert cursor.fetchone()[0].startswith("15")
    finally:
        connection.close()


def test_champion_rule_metric_direction_and_margin(registry_uri, capsys):

    from flexi_jest.config import ChampionRule
    client = tracking.mlflow_client()
    champion = bare_version(client, "rule")
    registry.promote("rule", champion, {"shapes.top1": 0.50, "shapes.loss": 1.0})
    rule = ChampionRule(metric="shapes.top1", min_margin=0.05)
    small_gain = bare_version(client, "rule")
    decision = registry.promote("rule", small_gain, {"shapes.top1": 0.54}, rule)
    assert not decision.promoted and "margin 0.05" in decision.reason
    lower_loss = bare_version(client, "rule")
    decision = registry.promote("rule", lower_loss, {"shapes.loss": 0.8, "shapes.top1": 0.1},
                                ChampionRule(metric="shapes.loss", direction="min"))
    assert decision.promoted and decision.champion_value == pytest.approx(1.0)
    assert str(client.get_model_version_by_alias("rule", "champion").version) == lower_loss
    assert str(client.get_model_version_by_alias("rule", "challenger").version) == small_gain
    assert "crowned: shapes.loss 0.8000" in capsys.readouterr().out
    with pytest.raises(Exception, match="direction"):
        ChampionRule(direction="up")


def test_a_challenger_is_not_crowned_on_a_metric_the_champion_lacks(registry_uri, capsys):
    """The issue's case: promote(..., "other_eval.top1", 0.0) crowned a model with 0.0, which then held both
    aliases. Now the champion keeps its title, and the reason is on the version's tags and printed."""

    from flexi_jest.config import ChampionRule
    client = tracking.mlflow_client()
    champion = bare_version(client, "lacks")
    registry.promote("lacks", champion, {"shapes.top1": 0.6})
    challenger = bare_version(client, "lacks")
    decision = registry.promote("lacks", challenger, {"other_eval.top1": 0.0}, ChampionRule(metric="other_eval.top1"))
    assert not decision.promoted and decision.alias == "challenger"
    reason = client.get_model_version("lacks", challenger).tags["flexi_jest.promotion"]
    assert reason == decision.reason and f"champion version {champion} has no metric 'other_eval.top1'" in reason
    assert reason in capsys.readouterr().out
    aliases = {a: str(client.get_model_version_by_alias("lacks", a).version) for a in ("champion", "challenger")}
    assert aliases == {"champion": champion, "challenger": challenger}
    missing = bare_version(client, "lacks")
    decision = registry.promote("lacks", missing, {"shapes.top1": 0.9}, ChampionRule(metric="shapes.top5"))
    assert not decision.promoted and "has no metric 'shapes.top5'" in decision.reason
    holders = [v.version for v in client.search_model_versions("name = 'lacks'")
               if "champion" in client.get_model_version("lacks", v.version).aliases]
    assert holders == [champion]


def test_a_metric_from_a_partial_eval_set_crowns_nobody_unless_the_rule_allows_it(registry_uri):
    """An evaluation with allow_partial scored only the readable part of a set (its shortfall > 0): its metric
    does not crown a version by default; ChampionRule(allow_partial=True) accepts it."""
    from flexi_jest.config import ChampionRule
    client = tracking.mlflow_client()
    champion = bare_version(client, "partial")
    registry.promote("partial", champion, {"shapes.top1": 0.4})
    better_but_partial = bare_version(client, "partial")
    decision = registry.promote("partial", better_but_partial, {"shapes.top1": 0.9}, shortfalls={"shapes": 12})
    assert not decision.promoted and "partial eval set (12 samples unreadable" in decision.reason
    assert str(client.get_model_version_by_alias("partial", "champion").version) == champion
    other_set = bare_version(client, "partial")  # a shortfall in another set leaves the compared metric whole
    assert registry.promote("partial", other_set, {"shapes.top1": 0.5}, shortfalls={"imagenet": 3}).promoted
    accepted = registry.promote("partial", better_but_partial, {"shapes.top1": 0.9}, ChampionRule(allow_partial=True),
                                shortfalls={"shapes": 12})
    assert accepted.promoted


def test_promote_and_rollback_commands(registry_uri, capsys):
    from flexi_jest.cli import main
    client = tracking.mlflow_client()
    first, second = bare_version(client, "cli-model"), bare_version(client, "cli-model")
    assert main(["promote", "--model", "cli-model", "--version", first]) == 0
    assert main(["promote", "--model", "cli-model", "--version", second]) == 0
    assert f"version {second} is now 'champion' (was version {first}" in capsys.readouterr().out
    assert main(["rollback", "--model", "cli-model"]) == 0
    assert f"rolled back from version {second} to version {first}" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("cli-model", "champion").version) == first
    assert str(client.get_model_version_by_alias("cli-model", "previous-champion").version) == second
    assert main(["promote", "--model", "cli-model", "--version", "99"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cli-model has no version 99" in err
    assert main(["rollback", "--model", "no-such-model"]) == 1
    assert "no version with alias 'previous-champion'" in capsys.readouterr().err


RACER = """
import sys, time
from pathlib import Path
from flexi_jest import registry, tracking
from flexi_jest.config import ChampionRule
model, version, value, sync = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
tracking.mlflow_client().get_registered_model(model)  # imports and connections done before the start
(sync / f"ready-{version}").touch()
while not (sync / "go").exists():
    time.sleep(0.01)
print(registry.promote(model, version, {"shapes.top1": value}, ChampionRule()).model_dump_json())
"""


def test_two_racing_promotions_end_with_the_better_model_as_champion(registry_uri, tmp_path):
    """Two processes promote at the same instant (both read the same champion): the registry lock makes them
    take turns, so the better challenger ends as champion, whichever writes last, and exactly one version
    holds `champion`."""
    import json

    client = tracking.mlflow_client()
    for round_ in range(2):
        model = f"race-{round_}"
        old = bare_version(client, model)
        registry.promote(model, old, {"shapes.top1": 0.3})
        better, worse = bare_version(client, model), bare_version(client, model)
        sync = tmp_path / model
        sync.mkdir()
        racers = [subprocess.Popen([sys.executable, "-c", RACER, model, version, str(value), str(sync)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "MLFLOW_TRACKING_URI": registry_uri})
                  for version, value in ((worse, 0.5), (better, 0.9))]
        deadline = time.time() + 300
        while not all((sync / f"ready-{v}").exists() for v in (better, worse)):
            assert time.time() < deadline and all(r.poll() is None for r in racers), \
                [r.communicate()[1][-2000:] for r in racers if r.poll() is not None]
            time.sleep(0.05)
        (sync / "go").touch()
        decisions = []
        for racer in racers:
            out, err = racer.communicate(timeout=300)
            assert racer.returncode == 0, err[-2000:]
            decisions.append(json.loads(out.strip().splitlines()[-1]))
        assert str(client.get_model_version_by_alias(model, "champion").version) == better
        holders = [v.version for v in client.search_model_versions(f"name = '{model}'")
                   if "champion" in client.get_model_version(model, v.version).aliases]
        assert holders == [better]
        assert str(client.get_model_version_by_alias(model, "previous-champion").version) in (old, worse)
        assert {d["version"]: d["promoted"] for d in decisions}[better] is True
        assert model + ".promotion-lock" not in {m.name for m in client.search_registered_models()}
