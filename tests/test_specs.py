"""Dataset specs as open_clip's --train-data takes them: directories, brace patterns, '::', single tars,
file://, s3:// (moto), http(s):// (http.server on loopback) and pipe: commands; bad specs fail in one line."""

import functools
import http.server
import io
import json
import re
import tarfile
import threading

import pytest
from webdataset import TarWriter

from conftest import BOTH_S3, free_port
from flexi_jest import storage
from flexi_jest.data import specs
from flexi_jest.data.access import DataAccess, granted
from flexi_jest.data.specs import SpecError, open_shard, resolve, write_shard_list


def write_tar(uri: str, keys: list[str], stats: bool = True) -> None:
    """An img2dataset-style shard (key.jpg/.txt/.json), with `<stem>_stats.json` beside it when stats."""
    buffer = io.BytesIO()
    with TarWriter(buffer) as writer:
        for key in keys:
            writer.write({"__key__": key, "jpg": b"not decoded here", "txt": f"caption {key}".encode(),
                          "json": json.dumps({"key": key}).encode()})
    storage.write_bytes(uri, buffer.getvalue())
    if stats:
        storage.write_bytes(uri.removesuffix(".tar") + "_stats.json", json.dumps({"successes": len(keys)}).encode())


def write_pool(root: str, shards: int = 3, per_shard: int = 4, stats: bool = True) -> str:
    storage.makedirs(root)
    for s in range(shards):
        write_tar(storage.join(root, f"{s:05d}.tar"), [f"{s:05d}{i:04d}" for i in range(per_shard)], stats)
    return root


def tar_keys(url: str) -> list[str]:
    with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        return sorted({member.name.split(".")[0] for member in tar})


def test_directory_brace_pattern_single_tar_and_joined_specs(tmp_path):
    pool = write_pool(str(tmp_path / "pool"))
    whole = resolve(pool)
    assert [s.name for s in whole.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert whole.num_samples == 12  # img2dataset's *_stats.json `successes`
    pattern = resolve(f"{pool}/{{00000..00001}}.tar")
    assert pattern.urls == [f"{pool}/00000.tar", f"{pool}/00001.tar"] and pattern.num_samples == 8
    single = resolve(f"file://{pool}/00002.tar")
    assert single.urls == [f"file://{pool}/00002.tar"] and single.num_samples == 4
    joined = resolve(f"{pool}/00002.tar::{pool}/{{00000..00001}}.tar")
    assert [s.name for s in joined.shards] == ["00002.tar", "00000.tar", "00001.tar"]
    assert tar_keys(joined.urls[0]) == ["000020000", "000020001", "000020002", "000020003"]


def test_counts_from_the_manifest_unknown_or_explicit(shapes_data, tmp_path):
    pool = shapes_data.splits["pool"]
    spec = resolve(pool.path)
    assert spec.num_samples == pool.num_samples and all(s.sha256 for s in spec.shards)
    bare = write_pool(str(tmp_path / "bare"), stats=False)
    assert resolve(bare).num_samples is None  # an unknown count is allowed (a pool)
    assert resolve(bare, num_samples=11).num_samples == 11


@BOTH_S3
def test_s3_prefix_and_pattern(s3):
    pool = write_pool(f"{s3}/laion/pool", shards=2)
    spec = resolve(pool)
    assert spec.urls == [f"{pool}/00000.tar", f"{pool}/00001.tar"] and spec.num_samples == 8
    assert resolve(f"{pool}/{{00000..00001}}.tar").num_samples == 8
    assert tar_keys(spec.urls[1]) == ["000010000", "000010001", "000010002", "000010003"]
    with pytest.raises(SpecError, match=r"missing shard s3://.*/00002.tar"):
        resolve(f"{pool}/{{00000..00002}}.tar")


@pytest.fixture
def http_pool(tmp_path):
    """The pool served by http.server on loopback."""
    pool = write_pool(str(tmp_path / "served"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=pool)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_urls_and_pipe_commands(http_pool, tmp_path):
    with granted(DataAccess(allow_http=True, pipe_commands=("cat",))):
        http_urls_and_pipe_commands(http_pool, tmp_path)


def http_urls_and_pipe_commands(http_pool, tmp_path):
    spec = resolve(f"{http_pool}/{{00000..00002}}.tar")
    assert len(spec.shards) == 3 and spec.num_samples is None
    assert tar_keys(spec.urls[1]) == ["000010000", "000010001", "000010002", "000010003"]
    pool = write_pool(str(tmp_path / "local"))
    piped = resolve(f"pipe:cat {pool}/00000.tar::pipe:cat {pool}/00001.tar")
    assert len(piped.shards) == 2
    assert tar_keys(piped.urls[1]) == ["000010000", "000010001", "000010002", "000010003"]


@pytest.mark.parametrize("case", ["missing shard", "unreachable url", "matches nothing", "no directory",
                                  "empty part", "bad pattern"])
def test_bad_specs_fail_in_one_line_naming_the_spec(case, tmp_path):
    pool = write_pool(str(tmp_path / "pool"))
    (tmp_path / "empty").mkdir()
    spec, reason = {
        "missing shard": (f"{pool}/{{00000..00005}}.tar", "missing shard"),
        "unreachable url": (f"http://127.0.0.1:{free_port()}/{{00000..00001}}.tar", "cannot reach"),
        "matches nothing": (str(tmp_path / "empty"), "no .tar shards"),
        "no directory": (str(tmp_path / "nowhere"), "not a directory"),
        "empty part": (f"{pool}::", "empty part"),
        "bad pattern": (f"{pool}/{{00000..00001.tar", "Unbalanced braces"),
    }[case]
    with pytest.raises(SpecError) as error, granted(DataAccess(allow_http=True)):
        resolve(spec)
    message = str(error.value)
    assert "\n" not in message and repr(spec) in message and reason in message
    # the message is the whole story: no internal exception chained under it (a traceback would print that too)
    assert error.value.__cause__ is None and (error.value.__context__ is None or error.value.__suppress_context__)


def test_a_failing_pipe_command_is_reported_when_read(tmp_path):
    with granted(DataAccess(pipe_commands=("cat",))):
        spec = resolve(f"pipe:cat {tmp_path}/absent.tar")  # commands are checked when run
        with pytest.raises(OSError, match="absent.tar"):
            tar_keys(spec.urls[0])


# ---- the data-access policy (data/access.py; issue 20, finding 1) ------------------------------------------------


def touching(marker) -> str:
    """A pipe: command that would create marker before printing a tar: a shell wrapper, as the probe planted."""
    return f"pipe:sh -c 'touch {marker}; cat /dev/null'"


@pytest.mark.parametrize("kind", ["shell", "plain command", "http"])
def test_pipe_and_http_specs_are_refused_by_default_and_nothing_runs(kind, tmp_path, http_pool):
    marker = tmp_path / "ran"
    spec, flag = {"shell": (touching(marker), "data_access.pipe_commands"),
                  "plain command": (f"pipe:touch {marker}", "data_access.pipe_commands"),
                  "http": (f"{http_pool}/00000.tar", "data_access.allow_http")}[kind]
    for attempt in (lambda: resolve(spec), lambda: resolve(f"{tmp_path}::{spec}"), lambda: open_shard(spec)):
        with pytest.raises(SpecError) as error:
            attempt()
        message = str(error.value)
        assert spec in message and flag in message and "docs/security.md" in message and "\n" not in message
    assert not marker.exists()


def test_only_the_programs_named_run_and_shells_need_naming_themselves(tmp_path):
    pool = write_pool(str(tmp_path / "pool"))
    marker = tmp_path / "ran"
    with granted(DataAccess(pipe_commands=("cat",))):
        assert tar_keys(resolve(f"pipe:cat {pool}/00000.tar").urls[0])[:1] == ["000000000"]
        refused = {touching(marker): "runs its arguments as a command",
                   f"pipe:env touch {marker}": "runs its arguments as a command",
                   f"pipe:python3 -c 'open(\"{marker}\", \"w\")'": "runs its arguments as a command",
                   f"pipe:{tmp_path}/cat {pool}/00000.tar": re.escape("not among the allowed pipe: programs ['cat']"),
                   f"pipe:touch {marker}": re.escape("not among the allowed pipe: programs ['cat']"),
                   "pipe:cat 'unbalanced": "cannot be split into arguments"}
        for spec, reason in refused.items():
            with pytest.raises(SpecError, match=reason):
                resolve(spec)
            with pytest.raises(SpecError, match=reason):
                open_shard(spec)
    assert not marker.exists()
    with granted(DataAccess(pipe_commands=("sh",))):  # named: the deployer's choice, and then it runs
        with open_shard(touching(marker)) as stream:
            assert stream.read() == b""
    assert marker.exists()


def test_the_policy_is_restored_after_a_granted_block(tmp_path):
    with granted(DataAccess(pipe_commands=("cat",))):
        resolve("pipe:cat x.tar")
    with pytest.raises(SpecError, match="pipe: specs are off"):
        resolve("pipe:cat x.tar")
    assert resolve("pipe:cat x.tar", check=False).urls == ["pipe:cat x.tar"]  # listing runs nothing; reading checks
    with pytest.raises(SpecError, match="pipe: specs are off"):
        open_shard("pipe:cat x.tar")


# ---- a spec resolved once: shard lists (write_shard_list; registration writes one per training split) -----------


def test_a_shard_list_reads_back_what_was_resolved_without_listing_again(shapes_data, tmp_path, monkeypatch):
    pool = write_pool(str(tmp_path / "pool"))
    joined = resolve(f"{pool}/{{00000..00001}}.tar::{shapes_data.splits['pool'].path}", num_samples=50)
    listed = str(tmp_path / "run" / "pool.shardlist.json")
    write_shard_list(listed, joined)
    write_tar(storage.join(pool, "00003.tar"), ["000030000"])  # the data changes after registration ...
    stats = []
    monkeypatch.setattr(specs, "_stats_count", lambda url: stats.append(url))
    again = resolve(listed)
    assert again.shards == joined.shards and again.num_samples == 50  # ... and the list's readers do not see it
    assert any(s.sha256 for s in again.shards) and any(s.num_samples == 4 and not s.sha256 for s in again.shards)
    assert stats == []  # no stats file fetched again: the counts come from the list
    assert resolve(listed, num_samples=7).num_samples == 7  # an explicit count still wins
    assert resolve(f"{listed}::{pool}/00003.tar").urls == joined.urls + [f"{pool}/00003.tar"]


@BOTH_S3
def test_a_shard_list_on_s3_is_checked_against_one_listing(s3, monkeypatch):
    pool = write_pool(f"{s3}/laion/pool", shards=3)
    listed = f"{s3}/run/pool.shardlist.json"
    write_shard_list(listed, resolve(pool))
    calls = []
    for name in ("list_names", "exists"):
        real = getattr(storage, name)
        monkeypatch.setattr(storage, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    assert resolve(listed).num_samples == 12
    assert calls == ["list_names"]  # three shards in one directory: one listing, no request per shard
    single = f"{s3}/run/one.shardlist.json"
    write_shard_list(single, resolve(f"{pool}/00002.tar"))
    calls.clear()
    assert resolve(single).num_samples == 4 and calls == ["exists"]  # one shard: asked for, not listed
    storage.remove(f"{pool}/00001.tar")
    with pytest.raises(SpecError, match=r"shard list s3://.*pool.shardlist.json: missing shard s3://.*/00001.tar; "
                                        "the data changed since the list was written"):
        resolve(listed)
    assert len(resolve(listed, check=False).shards) == 3  # unchecked, as for any spec: the read reports it


def test_the_urls_in_a_shard_list_pass_the_data_access_policy(tmp_path):
    pool = write_pool(str(tmp_path / "pool"))
    marker = tmp_path / "ran"
    listed = str(tmp_path / "pool.shardlist.json")
    with granted(DataAccess(pipe_commands=("cat",))):
        write_shard_list(listed, resolve(f"pipe:cat {pool}/00000.tar::{pool}/00001.tar"))
        assert tar_keys(resolve(listed).urls[0])[:1] == ["000000000"]
    with pytest.raises(SpecError, match=r"shard list .*pool.shardlist.json: .*data_access.pipe_commands"):
        resolve(listed)  # a later stage without the grant may not run what the list names
    planted = json.loads((tmp_path / "pool.shardlist.json").read_text())
    planted["shards"][0]["url"] = f"pipe:touch {marker}"
    (tmp_path / "pool.shardlist.json").write_text(json.dumps(planted))
    with granted(DataAccess(pipe_commands=("cat",))), pytest.raises(SpecError, match="not among the allowed"):
        resolve(listed)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["not json", "wrong format", "no shards", "url not a string", "a list in a list",
                                  "negative count", "bad sha256", "zero total", "missing file"])
def test_a_bad_shard_list_fails_in_one_line_naming_it_and_the_field(case, tmp_path):
    pool = write_pool(str(tmp_path / "pool"))
    listed = tmp_path / "pool.shardlist.json"
    write_shard_list(str(listed), resolve(pool))
    good = json.loads(listed.read_text())
    entry = good["shards"][0]
    document, reason = {
        "not json": ('{"format": ', "is not JSON"),
        "wrong format": ({**good, "format": "flexi-jest-shards/1"}, "format must be 'flexi-jest-shardlist/1'"),
        "no shards": ({**good, "shards": []}, "'shards' must be a non-empty list"),
        "url not a string": ({**good, "shards": [{**entry, "url": 7}]}, r"shards\[0\].url must be a non-empty"),
        "a list in a list": ({**good, "shards": [{**entry, "url": str(listed)}]}, "is a spec, not a shard"),
        "negative count": ({**good, "shards": [{**entry, "num_samples": -1}]}, r"shards\[0\].num_samples must be"),
        "bad sha256": ({**good, "shards": [{**entry, "sha256": "abc"}]}, r"shards\[0\].sha256 must be 64"),
        "zero total": ({**good, "num_samples": 0}, "'num_samples' must be a positive integer or null"),
        "missing file": (None, "no such file"),
    }[case]
    if document is None:
        listed.unlink()
    else:
        listed.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(SpecError, match=reason) as error:
        resolve(str(listed))
    assert "\n" not in str(error.value) and str(listed) in str(error.value)
    with pytest.raises(ValueError, match="ends in .shardlist.json"):
        write_shard_list(str(tmp_path / "pool.json"), resolve(pool))
