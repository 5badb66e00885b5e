"""`python -m mochi_preview.download` against a local HTTP server that serves tiny models in the Hub's layout
(the endpoints huggingface_hub calls: /api/models/{repo}/revision/{rev}?blobs=true and /{repo}/resolve/{rev}/{file}
with X-Repo-Commit, ETag / X-Linked-Etag and X-Linked-Size), never the real Hub."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mochi_preview import download, verify
from mochi_preview.dit.layout import load_dit
from mochi_preview.text import TextEncoder
from mochi_preview.tiny import save_random_model, save_tiny_t5_diffusers_layout

COMMIT = "a" * 40
LFS = (".safetensors", ".model", ".bin")  # stored with Git LFS on the Hub: their ETag is their SHA-256


class FakeHub:
    """repo -> {path: bytes}, served over HTTP; records each request; `cut` makes the next GETs of a file stop after
    a number of bytes (an interrupted download)."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos, self.requests, self.cut = repos, [], {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.serve(self, body=False)

            def do_GET(self):
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def info(self, repo: str) -> dict:
        siblings = []
        for name, data in sorted(self.repos[repo].items()):
            entry = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if name.endswith(LFS):
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        return {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings}

    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        self.requests.append((h.command, path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and "/".join(parts[2:4]) in self.repos and parts[4:5] in ([], ["revision"]):
            return self.send(h, 200, json.dumps(self.info("/".join(parts[2:4]))).encode(), {}, body)
        repo = "/".join(parts[:2])
        if repo in self.repos and parts[2:3] == ["resolve"] and "/".join(parts[4:]) in self.repos[repo]:
            name = "/".join(parts[4:])
            data = self.repos[repo][name]
            lfs = name.endswith(LFS)
            etag = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if lfs:
                headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
            start = int(h.headers["Range"].split("=")[1].split("-")[0]) if h.headers.get("Range") else 0
            status = 206 if start else 200
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if body and name in self.cut:  # announce it all, send part, hang up
                h.send_response(status)
                for k, v in headers.items():
                    h.send_header(k, v)
                h.send_header("Content-Length", str(len(data) - start))
                h.end_headers()
                h.wfile.write(data[start : self.cut[name]])
                h.wfile.flush()
                h.close_connection = True
                return
            return self.send(h, status, data[start:], headers, body)
        self.send(h, 404, b'{"error": "Repository Not Found"}', {"X-Error-Code": "RepoNotFound"}, body)

    @staticmethod
    def send(h, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def fetched(self) -> set[str]:
        return {p.split(f"/resolve/{COMMIT}/")[1] for c, p, _ in self.requests if c == "GET" and "/resolve/" in p}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """genmo/mochi-1-preview as the Hub holds it: native files at the top, diffusers folders beside them (with bf16
    variants and files no layout needs); FastVideo/FastMochi: another DiT."""
    root = tmp_path_factory.mktemp("hub")
    native = save_random_model(root / "native", encoder=True)
    save_tiny_t5_diffusers_layout(root / "t5")
    genmo = {n: (native / n).read_bytes() for n in download.NATIVE_FILES}
    genmo |= folder_files(root / "t5") | {"README.md": b"# Mochi", ".gitattributes": b"*.safetensors lfs"}
    genmo |= {"text_encoder/model.bf16.safetensors": b"t5-bf16", "model_index.json": b"{}"}
    for component in ("transformer", "vae"):
        genmo |= {
            f"{component}/config.json": b"{}",
            f"{component}/diffusion_pytorch_model.safetensors.index.json": b"{}",
            f"{component}/diffusion_pytorch_model-00001-of-00002.safetensors": component.encode() + b"-1",
            f"{component}/diffusion_pytorch_model-00002-of-00002.safetensors": component.encode() + b"-2",
            f"{component}/diffusion_pytorch_model.bin": b"pickle",
        }
    genmo |= {
        "transformer/diffusion_pytorch_model.bf16.safetensors": b"dit-bf16",
        "scheduler/scheduler_config.json": b"{}",
    }
    fast = {
        "dit.safetensors": save_random_model(root / "fast", seed=1, encoder=False)
        .joinpath("dit.safetensors")
        .read_bytes()
    }
    return {download.GENMO: genmo, download.FAST_NATIVE: fast | {"decoder.safetensors": b"not used"}}


@pytest.fixture
def hub(repos, monkeypatch):
    server = FakeHub(repos)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield server
    server.server.shutdown()


def test_native_fetches_only_its_files_and_the_folder_loads(hub, repos, tmp_path):
    out = tmp_path / "mochi"
    assert download.main([str(out)]) == 0
    t5 = {
        n
        for n in repos[download.GENMO]
        if n.startswith("tokenizer/") or n in ("text_encoder/config.json", "text_encoder/model.safetensors")
    }
    assert hub.fetched() == set(download.NATIVE_FILES) | t5
    manifest = verify.read_manifest(out)
    assert set(manifest) == hub.fetched()
    for name, entry in manifest.items():  # the Hub's size and SHA-256 (its LFS hash) for each
        assert entry == verify.Entry(
            len(repos[download.GENMO][name]), hashlib.sha256(repos[download.GENMO][name]).hexdigest()
        )
    source = json.loads((out / verify.MANIFEST).read_text())["source"]
    assert source == {"hub": hub.url, "repos": {download.GENMO: COMMIT}}
    verify.check_hashes(out)
    assert (
        load_dit(out, dtype=torch.float32) is not None
        and TextEncoder.from_folder(out).encode(["a lemon"])[0].isfinite().all()
    )


def test_fast_takes_fastmochis_dit_and_genmos_vae(hub, repos, tmp_path):
    out = tmp_path / "fast"
    download.download(out, fast=True)
    assert (out / "dit.safetensors").read_bytes() == repos[download.FAST_NATIVE]["dit.safetensors"]
    assert (out / "decoder.safetensors").read_bytes() == repos[download.GENMO]["decoder.safetensors"]
    assert json.loads((out / verify.MANIFEST).read_text())["source"]["repos"] == {
        download.FAST_NATIVE: COMMIT, download.GENMO: COMMIT
    }  # fmt: skip


def test_diffusers_layout_and_variant(hub, repos, tmp_path):
    download.download(tmp_path / "plain", layout="diffusers")
    plain = {n for n in hub.fetched()}
    assert plain == {
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", *(n for n in repos[download.GENMO] if n.startswith("tokenizer/")),
        *(f"{c}/{f}" for c in ("transformer", "vae") for f in ("config.json",
          "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-00001-of-00002.safetensors",
          "diffusion_pytorch_model-00002-of-00002.safetensors")),
    }  # fmt: skip
    hub.requests.clear()
    said = []
    download.download(tmp_path / "bf16", layout="diffusers", variant="bf16", log=said.append)
    assert "vae/ has no bf16 weights; fetching its plain ones" in said
    bf16 = hub.fetched()
    assert {"transformer/diffusion_pytorch_model.bf16.safetensors", "text_encoder/model.bf16.safetensors"} <= bf16
    assert "vae/diffusion_pytorch_model-00001-of-00002.safetensors" in bf16
    assert (
        not {"transformer/diffusion_pytorch_model-00001-of-00002.safetensors", "text_encoder/model.safetensors"} & bf16
    )


def test_interrupted_download_resumes_where_it_stopped(hub, repos, tmp_path):
    out = tmp_path / "mochi"
    dit = repos[download.GENMO]["dit.safetensors"]
    hub.cut["dit.safetensors"] = 100_000
    assert download.main([str(out)]) == 1  # the connection drops at 100,000 bytes, every time
    assert not (out / "dit.safetensors").exists() and not (out / verify.MANIFEST).exists()
    assert (out / ".dit.safetensors.part").stat().st_size == 100_000  # kept for the next run
    files = download.plan("native", None, False, hub.url, None)
    assert download.check_space(out, files) == sum(f.size for f in files) - 100_000
    del hub.cut["dit.safetensors"]
    hub.requests.clear()
    assert download.main([str(out)]) == 0
    assert ("GET", f"/{download.GENMO}/resolve/{COMMIT}/dit.safetensors", "bytes=100000-") in hub.requests
    assert (out / "dit.safetensors").read_bytes() == dit
    verify.check_hashes(out)


def test_space_is_checked_before_anything_is_fetched(hub, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage._replace(free=download.SPARE_BYTES + 1000))
    with pytest.raises(download.DownloadError, match=r"not enough disk space .* GB to fetch"):
        download.download(tmp_path / "mochi")
    assert hub.fetched() == set() and not (tmp_path / "mochi").exists()


def test_a_file_that_differs_from_the_hubs_hash_is_removed(hub, repos, tmp_path, monkeypatch):
    real = hub.info

    def lying(repo):
        info = real(repo)
        for s in info["siblings"]:
            if s["rfilename"] == "decoder.safetensors":
                s["lfs"]["sha256"] = "0" * 64
        return info

    monkeypatch.setattr(hub, "info", lying)
    with pytest.raises(download.DownloadError, match=r"decoder\.safetensors from genmo/mochi-1-preview does not match"):
        download.download(tmp_path / "mochi")
    assert not (tmp_path / "mochi" / "decoder.safetensors").exists()


def test_usage_errors_exit_2(tmp_path, capsys):
    for argv in ([str(tmp_path), "--variant", "bf16"], [str(tmp_path), "--layout", "comfy"], []):
        with pytest.raises(SystemExit) as e:
            download.main(argv)
        assert e.value.code == 2
    assert "--variant bf16 applies to --layout diffusers" in capsys.readouterr().err


def test_weights_variant_names():
    v = download.weights_variant
    assert v("model.safetensors") is None and v("diffusion_pytorch_model-00001-of-00004.safetensors") is None
    assert (
        v("model.bf16.safetensors") == "bf16" and v("diffusion_pytorch_model.bf16-00001-of-00002.safetensors") == "bf16"
    )
    assert v("model.safetensors.index.json") is None and v("model.safetensors.index.bf16.json") == "bf16"
    assert v("pytorch_model.bin") is False and v("config.json") is False
