"""``bridge deploy cloudflare`` against the stand-in of Cloudflare's API (``tests/cloudflare_api.py``,
which checks each call's shape as Cloudflare documents it), and the shipped Worker bundle against its
sources. That the uploaded bundle really serves as a relay under workerd is checked by the
conformance suite's ``cloudflare-deployed`` variant (``tests/conformance``)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.deploy import _bundle
from bridge.deploy._cfapi import ACCOUNT_READ, SCRIPTS_EDIT, CloudflareAPI
from bridge.deploy.cloudflare import Deployed, delete, deploy, derive_node_token
from bridge.errors import ConfigError, DeployError

from .cloudflare_api import ACCOUNT, NAME, CloudflareStandIn
from .procs import ROOT, bridge_cmd

OTHER = "fedcba9876543210fedcba9876543210"
TOKEN = "cf-test-token-all-permissions-0001"


@pytest.fixture
def standin() -> Iterator[Callable[..., CloudflareStandIn]]:
    made: list[CloudflareStandIn] = []

    def make(*args: str) -> CloudflareStandIn:
        api = CloudflareStandIn(*args)
        made.append(api)
        return api

    yield make
    for api in made:
        api.proc.stop()


@pytest.fixture
def cf(standin: Callable[..., CloudflareStandIn]) -> CloudflareStandIn:
    """One account, no workers.dev subdomain yet, a token with every permission deploying needs."""
    return standin("--token", f"{TOKEN}=edit,read,account", "--account", f"{ACCOUNT}=Alice")


def _deploy(cf: CloudflareStandIn, **kw: Any) -> Deployed:
    return deploy(kw.pop("api_token", TOKEN), api_base=cf.base, **kw)


# ------------------------------------------------------------------------------------ the bundle


def test_shipped_bundle_is_built_from_the_current_sources() -> None:
    project = ROOT / "deployment" / "cloudflare"
    folder = ROOT / "bridge" / "deploy" / "worker"
    manifest = json.loads((folder / "manifest.json").read_text())
    rebuild = "run `.venv/bin/python scripts/build_worker.py` and commit bridge/deploy/worker/"
    assert manifest["inputs_sha256"] == _bundle.inputs_digest(project), f"stale Worker bundle: {rebuild}"
    code = (folder / manifest["main_module"]).read_bytes()
    assert hashlib.sha256(code).hexdigest() == manifest["bundle_sha256"], f"bundle edited by hand: {rebuild}"
    assert {k: manifest[k] for k in _bundle.manifest_from_wrangler_toml(project / "wrangler.toml")} == (
        _bundle.manifest_from_wrangler_toml(project / "wrangler.toml")
    )
    bundle = _bundle.load_bundle()  # what the installed package reads
    assert bundle.code == code and bundle.durable_objects == (("RELAY", "RelayObject"),)
    assert b"export {" in code and b"RelayObject" in code


@pytest.mark.workerd
def test_a_fresh_build_gives_the_shipped_bundle_byte_for_byte() -> None:
    """The build is reproducible, so CI can prove the shipped bundle is what the sources give."""
    done = subprocess.run(
        [sys.executable, "scripts/build_worker.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------------ deploying


def test_first_deploy_uploads_the_worker_as_cloudflare_documents_it(cf: CloudflareStandIn) -> None:
    lines: list[str] = []
    d = _deploy(cf, progress=lines.append)
    assert d.url == f"https://{NAME}.kb-{ACCOUNT[:8]}.workers.dev" and d.ws_url.startswith("wss://")
    assert d.created and d.migration == "v1" and d.account_id == ACCOUNT
    assert d.node_token == derive_node_token(TOKEN, ACCOUNT, NAME) and len(d.node_token) >= 43
    assert d.client_key is not None and d.client_key.startswith("bk_")

    worker = cf.worker()
    bundle = _bundle.load_bundle()
    assert worker["module_sha256"] == hashlib.sha256(bundle.code).hexdigest()  # the shipped bytes
    meta = worker["metadata"]
    assert meta["main_module"] == "index.js" and meta["compatibility_date"] == bundle.compatibility_date
    assert meta["migrations"] == {"new_tag": "v1", "steps": [{"new_sqlite_classes": ["RelayObject"]}]}
    assert meta["keep_bindings"] == ["secret_text"]
    types = {b["name"]: b["type"] for b in meta["bindings"]}
    assert types["RELAY"] == "durable_object_namespace"
    assert {types[v] for v in bundle.vars} == {"plain_text"}
    assert cf.secrets() == {
        "NODE_TOKEN": d.node_token,
        "CLIENT_KEY_HASHES": hashlib.sha256(d.client_key.encode()).hexdigest(),
        "COOKIE_SECRET": cf.secrets()["COOKIE_SECRET"],
    }
    assert worker["workers_dev"] is True and cf.state()["subdomains"] == {ACCOUNT: f"kb-{ACCOUNT[:8]}"}
    assert cf.calls() == [
        "GET /accounts 200",
        f"GET /accounts/{ACCOUNT}/workers/services/{NAME} 404",
        f"PUT /accounts/{ACCOUNT}/workers/scripts/{NAME} 200",
        f"GET /accounts/{ACCOUNT}/workers/subdomain 404",
        f"PUT /accounts/{ACCOUNT}/workers/subdomain 200",
        f"POST /accounts/{ACCOUNT}/workers/scripts/{NAME}/subdomain 200",
    ]
    assert not any(d.node_token in line or d.client_key in line or TOKEN in line for line in lines)


def test_a_second_deploy_updates_in_place_and_keeps_keys_and_migrations(cf: CloudflareStandIn) -> None:
    first = _deploy(cf)
    secrets_before = cf.secrets()
    second = _deploy(cf, vars={"GRACE": "12"})
    assert (second.created, second.migration, second.client_key) == (False, None, None)
    assert second.node_token == first.node_token and second.url == first.url
    worker = cf.worker()
    assert worker["uploads"] == 2 and worker["migration_tag"] == "v1"
    assert "migrations" not in worker["metadata"], "new_sqlite_classes must be applied only once"
    sent = {b["name"] for b in worker["metadata"]["bindings"] if b["type"] == "secret_text"}
    assert sent == {"NODE_TOKEN"}, "the kept secrets are not sent again"
    assert cf.secrets() == secrets_before  # kept through keep_bindings
    assert {b["name"]: b.get("text") for b in worker["bindings"]}["GRACE"] == "12"
    assert f"PUT /accounts/{ACCOUNT}/workers/subdomain 200" not in cf.calls()[6:]

    third = _deploy(cf, new_key=True)
    assert third.client_key is not None and third.client_key != first.client_key
    assert cf.secrets()["CLIENT_KEY_HASHES"] == hashlib.sha256(third.client_key.encode()).hexdigest()
    assert cf.secrets()["COOKIE_SECRET"] == secrets_before["COOKIE_SECRET"]
    assert {b["name"]: b.get("text") for b in cf.worker()["bindings"]}["GRACE"] == "30"  # back to default


def test_given_keys_and_node_token_are_used(cf: CloudflareStandIn) -> None:
    keys = ["bk_aaaa0001_first-key-for-the-test", "bk_bbbb0002_second-key-for-the-test"]
    d = _deploy(cf, api_keys=keys, node_token="my-own-node-token-0123456789")
    assert d.client_key is None and d.node_token == "my-own-node-token-0123456789"
    assert cf.secrets()["NODE_TOKEN"] == "my-own-node-token-0123456789"
    assert cf.secrets()["CLIENT_KEY_HASHES"] == ",".join(hashlib.sha256(k.encode()).hexdigest() for k in keys)


def test_migrations_are_applied_in_order_by_tag(cf: CloudflareStandIn) -> None:
    v1 = _bundle.load_bundle()
    v2 = replace(v1, migrations=(*v1.migrations, {"tag": "v2", "new_sqlite_classes": ["Spare"]}))
    assert _deploy(cf, bundle=v1).migration == "v1"
    assert _deploy(cf, bundle=v2).migration == "v2"
    meta = cf.worker()["metadata"]
    assert meta["migrations"] == {
        "old_tag": "v1",
        "new_tag": "v2",
        "steps": [{"new_sqlite_classes": ["Spare"]}],
    }
    assert _deploy(cf, bundle=v2).migration is None
    assert cf.worker()["migration_tag"] == "v2" and cf.worker()["classes"] == ["RelayObject", "Spare"]


def test_the_stand_in_refuses_a_class_created_twice(cf: CloudflareStandIn) -> None:
    """What a deploy without the tag logic would hit: Cloudflare creates a class once."""
    _deploy(cf)
    bundle = _bundle.load_bundle()
    meta = {
        "main_module": "index.js",
        "compatibility_date": bundle.compatibility_date,
        "migrations": {"old_tag": "v1", "new_tag": "v1", "steps": [{"new_sqlite_classes": ["RelayObject"]}]},
    }
    with CloudflareAPI(TOKEN, base_url=cf.base) as api, pytest.raises(DeployError, match="already exists"):
        api.upload(ACCOUNT, NAME, meta, "index.js", bundle.code)


def test_a_worker_with_a_foreign_migration_tag_is_not_overwritten(cf: CloudflareStandIn) -> None:
    bundle = _bundle.load_bundle()
    foreign = {
        "main_module": "index.js",
        "compatibility_date": "2026-01-01",
        "migrations": {"new_tag": "someone-elses", "steps": [{"new_sqlite_classes": ["Theirs"]}]},
    }
    with CloudflareAPI(TOKEN, base_url=cf.base) as api:
        api.upload(ACCOUNT, NAME, foreign, "index.js", b"export default {};")
    with pytest.raises(DeployError, match="someone-elses"):
        _deploy(cf, bundle=bundle)
    assert cf.worker()["uploads"] == 1


def test_transient_errors_are_retried(cf: CloudflareStandIn) -> None:
    httpx.post(cf.url + "/_standin/fail?n=3", timeout=10)
    assert _deploy(cf).created
    assert [c for c in cf.calls() if c.endswith(" 503")] == ["GET /accounts 503"] * 3


# ------------------------------------------------------------------------------------ refusals


def test_a_token_lacking_a_permission_gets_the_permission_named(
    standin: Callable[..., CloudflareStandIn],
) -> None:
    api = standin(
        "--token", "read-only=read,account", "--token", "no-account=edit,read",
        "--account", f"{ACCOUNT}=Alice",
    )  # fmt: skip
    with pytest.raises(DeployError) as caught:
        _deploy(api, api_token="read-only")
    assert caught.value.permission == SCRIPTS_EDIT and caught.value.status == 403
    assert "Workers Scripts > Edit" in str(caught.value) and "upload the Worker" in str(caught.value)
    assert "read-only" not in str(caught.value)

    with pytest.raises(DeployError) as caught:
        _deploy(api, api_token="no-account")
    assert caught.value.permission == ACCOUNT_READ and "--account-id" not in str(caught.value)
    assert _deploy(api, api_token="no-account", account_id=ACCOUNT).created  # the id makes it unneeded

    with pytest.raises(DeployError, match="refused the API token") as caught:
        _deploy(api, api_token="not-a-token-at-all")
    assert caught.value.code == 9109 and "not-a-token-at-all" not in str(caught.value)


def test_accounts_are_looked_up_only_when_unambiguous(standin: Callable[..., CloudflareStandIn]) -> None:
    api = standin(
        "--token", f"{TOKEN}=edit,read,account", "--account", f"{ACCOUNT}=Alice", "--account", f"{OTHER}=Bob"
    )
    with pytest.raises(ConfigError, match=rf"2 accounts: choose one with --account-id \({ACCOUNT} \(Alice\)"):
        _deploy(api)
    assert _deploy(api, account_id=OTHER).account_id == OTHER
    with pytest.raises(ConfigError, match="Worker name"):
        _deploy(api, account_id=OTHER, name="Not_A_Hostname")
    with pytest.raises(ConfigError, match="unknown --var NOPE"):
        _deploy(api, account_id=OTHER, vars={"NOPE": "1"})


def test_an_existing_workers_dev_subdomain_is_used_and_a_taken_one_explained(
    standin: Callable[..., CloudflareStandIn],
) -> None:
    api = standin(
        "--token", f"{TOKEN}=edit,read,account", "--account", f"{ACCOUNT}=Alice", "--account", f"{OTHER}=Bob",
        "--subdomain", f"{ACCOUNT}=alice", "--taken", "popular",
    )  # fmt: skip
    assert _deploy(api, account_id=ACCOUNT).url == f"https://{NAME}.alice.workers.dev"
    assert not any(c.startswith(f"PUT /accounts/{ACCOUNT}/workers/subdomain") for c in api.calls())
    with pytest.raises(DeployError, match="'popular' is taken: choose another with --subdomain"):
        _deploy(api, account_id=OTHER, subdomain="popular")
    assert (
        _deploy(api, account_id=OTHER, subdomain="bobs-relay").url == f"https://{NAME}.bobs-relay.workers.dev"
    )


def test_delete_removes_the_worker_and_its_durable_object(cf: CloudflareStandIn) -> None:
    _deploy(cf)
    assert delete(TOKEN, api_base=cf.base) is True
    assert cf.state()["workers"] == {}
    assert cf.calls()[-1] == f"DELETE /accounts/{ACCOUNT}/workers/scripts/{NAME} 200"
    assert delete(TOKEN, api_base=cf.base) is False
    assert _deploy(cf).created  # and it comes back from scratch, migration included
    assert cf.worker()["migration_tag"] == "v1"


# ------------------------------------------------------------------------------------ the command


def _cli(cf: CloudflareStandIn, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CLOUDFLARE_API_TOKEN": TOKEN,
        "BRIDGE_CLOUDFLARE_API_URL": cf.base,
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [*bridge_cmd("deploy", "cloudflare"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_command_prints_the_url_and_a_key_once_and_never_a_token(
    cf: CloudflareStandIn, tmp_path: Path
) -> None:
    first = _cli(cf, tmp_path, "--var", "DEFAULT_ROUTE=ollama")
    assert first.returncode == 0, first.stderr
    node_token = cf.secrets()["NODE_TOKEN"]
    key = next(w for w in first.stdout.split() if w.startswith("bk_"))
    assert hashlib.sha256(key.encode()).hexdigest() == cf.secrets()["CLIENT_KEY_HASHES"]
    assert f"https://{NAME}.kb-{ACCOUNT[:8]}.workers.dev/" in first.stdout and "(created)" in first.stdout
    env_file = tmp_path / ".data" / "cloudflare" / f"{NAME}.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert f"BRIDGE_NODE_TOKEN={node_token}\n" in env_file.read_text()
    assert f"BRIDGE_RELAY=wss://{NAME}.kb-{ACCOUNT[:8]}.workers.dev\n" in env_file.read_text()

    second = _cli(cf, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "(updated)" in second.stdout and "kept" in second.stdout and "bk_" not in second.stdout
    assert cf.secrets()["CLIENT_KEY_HASHES"] == hashlib.sha256(key.encode()).hexdigest()
    for run in (first, second):
        for secret in (TOKEN, node_token):
            assert secret not in run.stdout + run.stderr
    assert (first.stdout + first.stderr).count(key) == 1

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    third = _cli(cf, elsewhere, "--new-key", "--env-file", "", "--var", "GRACE")
    assert third.returncode == 2 and "--var 'GRACE': expected NAME=VALUE" in third.stderr
    third = _cli(cf, elsewhere, "--new-key", "--env-file", "")
    new_key = next(w for w in third.stdout.split() if w.startswith("bk_"))
    assert new_key != key
    assert hashlib.sha256(new_key.encode()).hexdigest() == cf.secrets()["CLIENT_KEY_HASHES"]
    assert not (elsewhere / ".data").exists() and node_token not in third.stdout + third.stderr

    refused = _cli(cf, tmp_path, "--account-id", OTHER)
    assert refused.returncode == 2 and "lacks the permission" in refused.stderr  # an account it cannot see
    assert "error: " in refused.stderr and TOKEN not in refused.stderr

    gone = _cli(cf, tmp_path, "--delete", "--yes")
    assert gone.returncode == 0 and f"deleted the Worker {NAME}" in gone.stdout
    assert not env_file.exists() and cf.state()["workers"] == {}


def test_the_deployment_hook_deploys_then_finds_the_same_relay(
    cf: CloudflareStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the notebook does with a ``CLOUDFLARE_API_TOKEN`` secret and no ``BRIDGE_RELAY``: the
    relay deployed once (a client key shown once), found again by the next session (same URL and
    node token, no new key), and no secret in anything it says."""
    from deployment.kaggle_ollama_webui import CLOUDFLARE_DEPLOY, CloudflareRequest

    assert CLOUDFLARE_DEPLOY is not None
    monkeypatch.setenv("DEPLOY_CLOUDFLARE_API", cf.base)
    monkeypatch.setenv("DEPLOY_CLOUDFLARE_NAME", NAME)
    monkeypatch.delenv("CLOUDFLARE_ACCOUNT_ID", raising=False)
    said: list[str] = []
    first = CLOUDFLARE_DEPLOY(CloudflareRequest(TOKEN, tmp_path, said.append))
    second = CLOUDFLARE_DEPLOY(CloudflareRequest(TOKEN, tmp_path, said.append))
    assert first.url.startswith(f"wss://{NAME}.") and first.url.endswith(".workers.dev")
    assert first.key.startswith("bk_") and second.key == ""
    assert (second.url, second.node_token) == (first.url, first.node_token)
    assert first.node_token == derive_node_token(TOKEN, ACCOUNT, NAME)
    assert said and not any(s in line for line in said for s in (TOKEN, first.node_token, first.key))
