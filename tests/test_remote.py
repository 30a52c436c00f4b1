"""Sharing through DVC remotes with the real `dvc` CLI: a tiny pipeline run is pushed to a real S3-API server
(moto, 127.0.0.1 only) and to the committed default remote (~/.cache/charseg/dvc-remote, with HOME pointed at a
tmp dir), then pulled into fresh `git clone`s: whole, one model, the dataset alone; and what goes wrong:
an unreachable endpoint, corrupted and missing remote objects, absent credentials.

One pipeline run (demo profile + one-epoch training) and one S3 server serve every test of the module.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from pipeline_utils import TINY_TRAINING, copy_repo, dvc, git, stages_run
from s3_server import ACCESS_KEY, SECRET_KEY, S3Server, free_port, isolated_aws_env
from charseg.config import load_params
from charseg.sample import demo_overrides, generate

pytestmark = pytest.mark.slow

BUCKET = "charseg"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """HOME (where the default remote lives) and the AWS settings point into tmp for the whole module; no AWS
    keys in the environment: each clone gets them in its own .dvc/config.local, as a teammate would."""
    root = tmp_path_factory.mktemp("remote_env")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(root / "home"))
        for name, value in isolated_aws_env(root / "aws", credentials=False).items():
            patch.setenv(name, value)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        yield root / "home"


@pytest.fixture(scope="module")
def s3(home, tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("moto")) as server:
        server.create_bucket(BUCKET)
        yield server


def local_config(repo: Path, section: str, **options: str) -> None:
    """Append a section to .dvc/config.local (git-ignored), as `dvc remote add/modify --local` would write it,
    without paying a dvc start-up per key."""
    lines = [f"['{section}']"] + [f"    {key} = {value}" for key, value in options.items()]
    with open(repo / ".dvc" / "config.local", "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def local_s3_remote(repo: Path, name: str, prefix: str, endpoint: str, verify: bool = True) -> None:
    """A personal S3 remote with its keys, in .dvc/config.local only."""
    local_config(repo, f'remote "{name}"', url=f"s3://{BUCKET}/{prefix}", endpointurl=endpoint,
                 verify=str(verify).lower(), access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)


@pytest.fixture(scope="module")
def origin(home, s3, tmp_path_factory):
    """The teammate who runs the pipeline: tiny sample, full run, results committed, pushed to S3 and the default."""
    root = copy_repo(tmp_path_factory.mktemp("remote_origin") / "repo")
    generate(root / "data" / "raw", seed=0, duration_scale=0.2)
    dvc(root, "exp", "run", *demo_overrides(root / "params.sample.yaml"), *TINY_TRAINING)
    dvc(root, "add", "data/raw")  # README "Share data and models": the raw data, recorded once
    # The README's commands: the remote is committed, its keys stay in the git-ignored .dvc/config.local.
    dvc(root, "remote", "add", "s3", f"s3://{BUCKET}/pipeline")
    dvc(root, "remote", "modify", "s3", "endpointurl", s3.endpoint)
    dvc(root, "remote", "modify", "s3", "verify", "true")
    dvc(root, "remote", "modify", "--local", "s3", "access_key_id", ACCESS_KEY)
    dvc(root, "remote", "modify", "--local", "s3", "secret_access_key", SECRET_KEY)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "pipeline results")
    dvc(root, "push", "-r", "s3")
    dvc(root, "push")  # the committed default remote, under the tmp HOME
    return root


def file_hashes(root: Path, rel_paths) -> dict[str, str]:
    """{posix path relative to root: sha256} of every file under the given files/folders."""
    hashes = {}
    for rel in rel_paths:
        path = root / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            hashes[file.relative_to(root).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashes


def dvc_outputs(root: Path) -> list[str]:
    """Every output DVC tracks: the stage outs of dvc.lock and the raw data's .dvc file."""
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    outs = [out["path"] for stage in lock.values() for out in stage.get("outs", [])]
    for dvc_file in ("data/raw.dvc",):
        spec = yaml.safe_load((root / dvc_file).read_text(encoding="utf-8"))
        outs += [(Path(dvc_file).parent / out["path"]).as_posix() for out in spec["outs"]]
    return outs


def work_tree(root: Path) -> dict[str, str]:
    """Hashes of every file of the work tree but git's and DVC's own folders."""
    return {rel: digest for rel, digest in file_hashes(root, ["."]).items()
            if not rel.startswith((".git/", ".dvc/cache/", ".dvc/tmp/"))}


def clone(origin: Path, dest: Path, *, credentials: bool = True) -> Path:
    git(dest.parent, "clone", "-q", str(origin), dest.name)
    assert not (dest / ".dvc" / "cache").exists()  # nothing to check out but what a pull brings
    if credentials:
        local_config(dest, 'remote "s3"', access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    return dest


def object_path(file: Path) -> str:
    """Where DVC 3 stores a file's content, relative to a remote's or the cache's root."""
    digest = hashlib.md5(file.read_bytes()).hexdigest()
    return f"files/md5/{digest[:2]}/{digest[2:]}"


def test_s3_pull_into_a_fresh_clone_gives_the_same_bytes_and_nothing_to_rerun(origin, tmp_path):
    expected = file_hashes(origin, dvc_outputs(origin))
    for kind in ("data/raw/videos/", "data/raw/truth/", "data/frames/images/", "data/masks/images/"):
        assert any(rel.startswith(kind) for rel in expected), kind
    models = list(load_params(origin / "params.yaml")["models"])
    assert len(models) == 4 and "unetpp" in models
    assert "data/split.json" in expected and all(f"models/{name}/best.pt" in expected for name in models)

    repo = clone(origin, tmp_path / "clone")
    dvc(repo, "pull", "-r", "s3")
    assert file_hashes(repo, dvc_outputs(repo)) == expected
    assert "up to date" in dvc(repo, "status").stdout
    assert stages_run(dvc(repo, "repro").stdout) == set()
    assert git(repo, "status", "--porcelain") == ""


def test_partial_pull_of_one_stage_brings_that_model_only(origin, tmp_path):
    repo = clone(origin, tmp_path / "clone")
    dvc(repo, "pull", "-r", "s3", "train@unetpp")
    assert file_hashes(repo, ["models/unetpp"]) == file_hashes(origin, ["models/unetpp"])
    others = [name for name in load_params(origin / "params.yaml")["models"] if name != "unetpp"]
    assert others and not any((repo / "models" / name).exists() for name in others)
    assert not (repo / "data" / "frames").exists() and not (repo / "data" / "raw" / "videos").exists()


def test_pulled_dataset_alone_rebuilds_the_same_frames(origin, tmp_path):
    repo = clone(origin, tmp_path / "clone")
    dvc(repo, "pull", "-r", "s3", "data/raw.dvc")
    assert file_hashes(repo, ["data/raw/videos"]) == file_hashes(origin, ["data/raw/videos"])
    assert not (repo / "models" / "unetpp").exists()
    assert stages_run(dvc(repo, "repro", "frames").stdout) == {"frames"}
    assert file_hashes(repo, ["data/frames"]) == file_hashes(origin, ["data/frames"])
    assert git(repo, "status", "--porcelain") == ""  # dvc.lock: same hashes as the teammate's run


def test_default_remote_round_trip_under_home(origin, home, tmp_path):
    remote = home / ".cache" / "charseg" / "dvc-remote"
    assert any((remote / "files" / "md5").rglob("*.dir"))  # the fixture's plain `dvc push` landed there
    repo = clone(origin, tmp_path / "clone", credentials=False)
    assert str(remote) in dvc(repo, "remote", "list").stdout
    dvc(repo, "pull")
    assert file_hashes(repo, dvc_outputs(repo)) == file_hashes(origin, dvc_outputs(origin))
    assert "up to date" in dvc(repo, "status").stdout


def test_weights_travel_through_the_remote_and_the_pulled_detector_loads(origin, tmp_path):
    import torch
    from ultralytics import YOLO

    from charseg.labels.weights import load_yolo

    seeder = clone(origin, tmp_path / "seeder")
    weights = ["weights/yolov8s.pt", "weights/sam_vit_b_01ec64.pth"]
    YOLO("yolov8n.yaml").save(seeder / weights[0])  # offline stand-ins for the official files
    torch.save({"stand_in": torch.zeros(8)}, seeder / weights[1])
    dvc(seeder, "add", *weights)
    # weights/README.md's commands: the .dvc files are all there is to commit (the root .gitignore has the rest)
    assert {line[3:] for line in git(seeder, "status", "--porcelain").splitlines()} == {f"{w}.dvc" for w in weights}
    git(seeder, "add", *(f"{w}.dvc" for w in weights))
    git(seeder, "commit", "-q", "-m", "share the weights")
    dvc(seeder, "push", "-r", "s3", *(f"{w}.dvc" for w in weights))

    repo = clone(seeder, tmp_path / "clone")
    dvc(repo, "pull", "-r", "s3", *(f"{w}.dvc" for w in weights))
    assert file_hashes(repo, weights) == file_hashes(seeder, weights)
    assert load_yolo(repo / weights[0]).task == "detect"


def test_unreachable_endpoint_fails_clearly_and_deletes_nothing(origin, tmp_path, monkeypatch):
    repo = clone(origin, tmp_path / "clone")
    dvc(repo, "pull", "-r", "s3", "data/raw.dvc")
    closed = f"http://127.0.0.1:{free_port()}"
    local_s3_remote(repo, "down", "pipeline", closed)
    before = work_tree(repo)
    # One botocore attempt: by default it retries with back-off (~15 s for a push, ~30 s for a pull here).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    pulled = dvc(repo, "pull", "-r", "down", check=False)
    pushed = dvc(repo, "push", "-r", "down", "data/raw.dvc", check=False)
    for result in (pulled, pushed):
        assert result.returncode != 0
        assert f'Could not connect to the endpoint URL: "{closed}' in result.stderr, result.stderr
    assert work_tree(repo) == before


@pytest.mark.parametrize("verify", [True, False])
def test_corrupted_s3_object_is_caught_only_with_verify(origin, s3, tmp_path, verify):
    prefix = f"corrupt-verify-{verify}".lower()
    remote = f"corrupt{int(verify)}"
    local_s3_remote(origin, remote, prefix, s3.endpoint, verify)
    dvc(origin, "push", "-r", remote, "train@unetpp")
    checkpoint = origin / "models" / "unetpp" / "best.pt"
    good = checkpoint.read_bytes()
    bad = bytes([good[0] ^ 0xFF]) + good[1:]  # same size: only the content hash can tell
    s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}/{object_path(checkpoint)}", Body=bad)

    repo = clone(origin, tmp_path / "clone")
    local_s3_remote(repo, remote, prefix, s3.endpoint, verify)
    result = dvc(repo, "pull", "-r", remote, "train@unetpp", check=False)
    pulled = repo / "models" / "unetpp" / "best.pt"
    if verify:
        assert result.returncode != 0
        assert "models/unetpp" in result.stderr, result.stderr
        assert not pulled.exists()
        assert not (repo / ".dvc" / "cache" / object_path(checkpoint)).exists()  # dropped from the cache too
    else:  # why the default remote has verify = true: without it the bad bytes land silently
        assert result.returncode == 0
        assert pulled.read_bytes() == bad
        assert "changed outs" not in dvc(repo, "status", "train@unetpp").stdout  # and DVC sees nothing wrong


def test_corrupted_object_in_the_default_local_remote_fails_the_pull(origin, tmp_path):
    """Bit rot in the default remote's folder: the object keeps its read-only mode (DVC only re-hashes
    writable objects of a local remote on its own); the committed `verify = true` catches it."""
    remote = tmp_path / "local-remote"
    seeder = clone(origin, tmp_path / "seeder")
    local_config(seeder, 'remote "shared"', url=str(remote))
    dvc(seeder, "pull", "-r", "s3", "train@unetpp")
    dvc(seeder, "push", "train@unetpp")
    checkpoint = seeder / "models" / "unetpp" / "best.pt"
    stored = remote / object_path(checkpoint)
    mode = stored.stat().st_mode
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    stored.chmod(mode)

    repo = clone(origin, tmp_path / "clone", credentials=False)
    local_config(repo, 'remote "shared"', url=str(remote))
    result = dvc(repo, "pull", "train@unetpp", check=False)
    assert result.returncode != 0
    assert "models/unetpp" in result.stderr, result.stderr
    assert not (repo / "models" / "unetpp" / "best.pt").exists()


def test_missing_object_fails_the_pull_and_cloud_status_names_the_file(origin, s3, tmp_path):
    """DVC's pull names the missing object by hash only; `dvc status --cloud` names the file (as 'deleted')."""
    local_s3_remote(origin, "holey", "missing", s3.endpoint)
    dvc(origin, "push", "-r", "holey", "data/raw.dvc")
    lost = sorted((origin / "data" / "raw" / "videos").rglob("*.mp4"))[0]
    lost_rel = lost.relative_to(origin).as_posix()
    s3.client().delete_object(Bucket=BUCKET, Key=f"missing/{object_path(lost)}")

    repo = clone(origin, tmp_path / "clone")
    local_s3_remote(repo, "holey", "missing", s3.endpoint)
    result = dvc(repo, "pull", "-r", "holey", "data/raw.dvc", check=False)
    assert result.returncode != 0
    assert hashlib.md5(lost.read_bytes()).hexdigest() in result.stderr, result.stderr
    assert not (repo / "data" / "raw" / "videos").exists()  # no folder with a hole in it
    status = dvc(repo, "status", "--cloud", "-r", "holey", "data/raw.dvc", check=False)
    assert lost_rel in status.stdout, status.stdout


def test_absent_credentials_fail_with_a_message_saying_so(origin, tmp_path):
    assert SECRET_KEY not in git(origin, "show", "HEAD:.dvc/config")  # the keys never reached git
    repo = clone(origin, tmp_path / "clone", credentials=False)
    before = work_tree(repo)
    result = dvc(repo, "pull", "-r", "s3", check=False)
    assert result.returncode != 0
    assert "Unable to locate credentials" in result.stderr, result.stderr
    assert work_tree(repo) == before
