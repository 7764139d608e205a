"""Patched models as Hub repos (fs_mllm.hub): save, load, push up to the network, model cards, the HF cache.

What must hold: a saved patched model loads back (from a folder, and by repo id from a pre-populated HF
cache with HF_HUB_OFFLINE=1) with bit-identical smoothed features under the same seed, on several
families; fs_config.json is read strictly (missing, corrupt, extra keys, newer format, wrong family,
booster of another feature size: refused, naming the file); the card renders the measured numbers
with the Hub's metadata; push_to_hub drives the real huggingface_hub client up to the HTTP boundary
(a local server that records the requests and accepts no commit: nothing is pushed anywhere);
fs-mini-llava loads from the HF cache through the standard resolution code; ``fs-mllm save`` works as
an installed command. No test reaches the network.
"""

from __future__ import annotations

import http.server
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from fs_mllm.testing import IMAGE_TOKEN, VOCAB, build, build_llava, llava_config

import fs_mllm
from fs_mllm import GaussianSmoothnessBooster, GSBConfig, get_fs_state, is_patched, patch_model, unpatch_model
from fs_mllm.adapters import get_adapter
from fs_mllm.hub import FORMAT_VERSION, FS_CONFIG_NAME, read_saved_patch, render_card
from fs_mllm.models import MINI_LLAVA_REPO
from fs_mllm.models.hf_cache import cache_snapshot

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.48, 0.45, 0.40], [0.26, 0.26, 0.27]
FAMILIES = ("llava", "qwen2_vl", "paligemma")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network (huggingface_hub read HF_HUB_OFFLINE at import, so set its constant too)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def features(model, inputs) -> torch.Tensor:
    """The (smoothed, when patched) image features feeding the decoder, flattened."""
    owner = get_adapter(model).feature_owner(model)
    params = inspect.signature(owner.get_image_features).parameters
    with torch.no_grad():
        out = owner.get_image_features(**{k: v for k, v in inputs.items() if k in params}).pooler_output
    return torch.cat([x.reshape(-1) for x in out]) if isinstance(out, (list, tuple)) else out.reshape(-1)


def booster_for(model, seed: int = 1) -> GaussianSmoothnessBooster:
    """A small booster with non-trivial weights (a fresh one is the identity, which would prove nothing)."""
    torch.manual_seed(seed)
    booster = GaussianSmoothnessBooster(GSBConfig(
        feature_dim=get_adapter(model).feature_dim(model), denoiser_channels=8, denoiser_depth=3, mapper_hidden=16,
        mapper_layers=1, sigma_embed_dim=8, encoder_id="tiny test model"))
    with torch.no_grad():
        for p in booster.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return booster.eval()


def patched(family: str, booster: bool = True, **kw):
    model, inputs = build(family)
    patch_model(model, sigma=0.25, n_samples=4, seed=7, booster=booster_for(model) if booster else None,
                image_mean=MEAN, image_std=STD, **kw)
    return model, inputs


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_from_a_folder_gives_bit_identical_smoothed_features(family, tmp_path):
    model, inputs = patched(family)
    folder = fs_mllm.save_pretrained(model, tmp_path / "saved", include_weights=True)
    names = sorted(p.name for p in folder.iterdir())
    assert {FS_CONFIG_NAME, "README.md", "gsb.safetensors", "gsb_config.json", "model.safetensors", "config.json"} <= set(names)
    assert all(n.endswith((".json", ".safetensors", ".md")) for n in names), names  # nothing pickled
    saved = json.loads((folder / FS_CONFIG_NAME).read_text())
    assert saved["family"] == family and saved["format_version"] == FORMAT_VERSION and saved["weights_included"] is True
    assert saved["fs_config"] == get_fs_state(model).config.to_dict()
    assert saved["image_mean"] == pytest.approx(MEAN) and saved["image_std"] == pytest.approx(STD)

    loaded = fs_mllm.from_pretrained(folder)
    assert is_patched(loaded) and get_fs_state(loaded).booster is not None
    assert get_fs_state(loaded).config == get_fs_state(model).config
    expected = features(model, inputs)
    assert torch.equal(features(loaded, inputs), expected)
    unpatch_model(loaded)
    assert not torch.equal(features(loaded, inputs), expected)  # the comparison was about the smoothed path


def test_from_pretrained_passes_dtype_and_device_map_through_and_generates(tmp_path):
    model, inputs = patched("qwen2_vl")
    folder = fs_mllm.save_pretrained(model, tmp_path / "saved", include_weights=True)
    loaded = fs_mllm.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    assert loaded.dtype == torch.bfloat16 and is_patched(loaded)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    inputs = {k: (v.to(torch.bfloat16) if k == "pixel_values" else v) for k, v in inputs.items()}
    out = loaded.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_patch_from_saved_applies_its_settings_and_booster_and_patch_model_points_there(tmp_path):
    model, inputs = patched("llava")
    folder = fs_mllm.save_pretrained(model, tmp_path / "saved", include_weights=True)
    fresh, _ = build("llava")  # same weights (same seed), unpatched
    for call in (lambda: patch_model(fresh, str(folder)), lambda: patch_model(fresh, folder, n_samples=16)):
        with pytest.raises(ValueError, match=r"not a folder.*fs_mllm\.patch_from_saved\(model, '.*saved'\)"):
            call()  # settings below, the saved format above: patching never reads a folder itself
        assert not is_patched(fresh)
    assert fs_mllm.patch_from_saved(fresh, str(folder)) is fresh
    assert torch.equal(features(fresh, inputs), features(model, inputs))


def _cache_base_and_patch(tmp_path: Path, family: str, cache: Path):
    """A tiny base model published (in the cache) as tiny-org/tiny-<family>, and a patch referencing it."""
    from transformers import AutoModelForImageTextToText

    model, inputs = build(family)
    model.save_pretrained(tmp_path / "base")
    base_repo = f"tiny-org/tiny-{family.replace('_', '-')}"
    snapshot = cache_snapshot(tmp_path / "base", base_repo, cache_dir=cache)
    base = AutoModelForImageTextToText.from_pretrained(base_repo, cache_dir=str(cache), local_files_only=True,
                                                       adapter_kwargs={"local_files_only": True})
    patch_model(base, sigma=0.25, n_samples=4, seed=7, booster=booster_for(base), image_mean=MEAN, image_std=STD)
    folder = fs_mllm.save_pretrained(base, tmp_path / "fs", revision=snapshot.name)  # references the base, no weights
    fs_repo = f"fs-test/tiny-{family.replace('_', '-')}-fs"
    cache_snapshot(folder, fs_repo, cache_dir=cache)
    return base, inputs, base_repo, fs_repo, snapshot.name


@pytest.mark.parametrize("family", ("llava", "qwen2_vl"))
def test_round_trip_by_repo_id_from_a_prepopulated_hf_cache(family, tmp_path):
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hf-cache"
    base, inputs, base_repo, fs_repo, commit = _cache_base_and_patch(tmp_path, family, cache)
    saved = read_saved_patch(tmp_path / "fs" / FS_CONFIG_NAME)
    assert not saved.weights_included and saved.base_model == base_repo and saved.base_revision == commit
    assert not (tmp_path / "fs" / "model.safetensors").exists()  # the base is referenced, not copied
    snapshot = Path(snapshot_download(fs_repo, cache_dir=str(cache), local_files_only=True))
    assert (snapshot / FS_CONFIG_NAME).is_file() and snapshot.parent.parent.name == f"models--{fs_repo.replace('/', '--')}"
    assert (snapshot.parent.parent / "refs" / "main").read_text() == snapshot.name

    loaded = fs_mllm.from_pretrained(fs_repo, cache_dir=str(cache), local_files_only=True)
    assert loaded.name_or_path == base_repo and is_patched(loaded)
    assert torch.equal(features(loaded, inputs), features(base, inputs))


CHILD = textwrap.dedent("""
    import inspect, json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText
    import fs_mllm
    from fs_mllm.adapters import get_adapter

    def features(model, inputs):
        owner = get_adapter(model).feature_owner(model)
        params = inspect.signature(owner.get_image_features).parameters
        with torch.no_grad():
            out = owner.get_image_features(**{k: v for k, v in inputs.items() if k in params}).pooler_output
        return torch.cat([x.reshape(-1) for x in out]) if isinstance(out, (list, tuple)) else out.reshape(-1)

    fs_repo, base_repo, inputs_path, out_path = sys.argv[1:5]
    inputs = load_file(inputs_path)
    loaded = fs_mllm.from_pretrained(fs_repo)                    # no cache_dir: HF_HUB_CACHE, HF_HUB_OFFLINE=1
    base = AutoModelForImageTextToText.from_pretrained(base_repo)  # transformers' own resolution, offline
    fs_mllm.patch_from_saved(base, fs_repo)
    save_file({"from_pretrained": features(loaded, inputs), "patch_from_saved": features(base, inputs)}, out_path)
""")


def _child_env(cache: Path) -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # this checkout's fs_mllm
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("HF_HOME", None)
    return env


@pytest.mark.usefixtures("one_thread")  # the child runs with OMP_NUM_THREADS=1: same thread count, same float sums
def test_offline_process_loads_by_repo_id_from_hf_hub_cache(tmp_path):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE in a fresh process (huggingface_hub reads both at import)."""
    cache = tmp_path / "hf-cache"
    base, inputs, base_repo, fs_repo, _ = _cache_base_and_patch(tmp_path, "llava", cache)
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "child.py").write_text(CHILD)
    run = subprocess.run([sys.executable, str(tmp_path / "child.py"), fs_repo, base_repo, str(tmp_path / "inputs.safetensors"),
                          str(tmp_path / "out.safetensors")], env=_child_env(cache), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "huggingface.co" not in run.stderr  # nothing asked the Hub
    out = load_file(str(tmp_path / "out.safetensors"))
    expected = features(base, inputs)
    assert torch.equal(out["from_pretrained"], expected) and torch.equal(out["patch_from_saved"], expected)


# ---------------------------------------------------------------------------------------------
# fs_config.json is read strictly
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def saved_llava(tmp_path):
    model, inputs = patched("llava")
    return fs_mllm.save_pretrained(model, tmp_path / "saved", include_weights=True), model, inputs


def _edit(folder: Path, **changes):
    path = folder / FS_CONFIG_NAME
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is KeyError:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    ({"sigmaa": 0.25}, r"unknown SavedPatch fields \['sigmaa'\]"),
    ({"family": KeyError}, r"fields \['family'\] are required"),
    ({"weights_included": "yes"}, r"weights_included must be bool"),
    ({"fs_config": {"sigma": 0.25, "n_sample": 8}}, r"unknown FSConfig fields"),
    ({"fs_config": {"sigma": -1.0}}, r"sigma must be"),
    ({"image_std": [0.5, 0.0, 0.5]}, r"image_std must be positive"),
    ({"image_mean": [0.5, 0.5]}, r"image_mean must be 3"),
    ({"family": "blip"}, r"family 'blip' is not supported"),
    ({"format_version": FORMAT_VERSION + 1}, r"newer than .* upgrade fs_mllm"),
    ({"format_version": KeyError}, r"no valid format_version"),
    ({"weights_included": False, "base_model": None}, r"base_model is required"),
    ({"weights_included": False, "base_model": "../../etc"}, r"base_model must be a Hub repo id"),
])
def test_bad_fs_config_is_refused_naming_the_file(saved_llava, change, message):
    folder, _, _ = saved_llava
    _edit(folder, **change)
    with pytest.raises(ValueError, match=message) as error:
        fs_mllm.from_pretrained(folder)
    assert str(folder / FS_CONFIG_NAME) in str(error.value)


def test_corrupt_or_missing_fs_config_is_refused(saved_llava, tmp_path):
    folder, model, _ = saved_llava
    (folder / FS_CONFIG_NAME).write_text('{"format_version": 1, "family": "lla')
    with pytest.raises(ValueError, match=r"not valid UTF-8 JSON.*save the patched model again") as error:
        fs_mllm.from_pretrained(folder)
    assert str(folder / FS_CONFIG_NAME) in str(error.value)
    (folder / FS_CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object"):
        fs_mllm.from_pretrained(folder)
    plain = tmp_path / "plain"
    build("llava")[0].save_pretrained(plain)  # a transformers folder, never patched
    for call in (lambda: fs_mllm.from_pretrained(plain), lambda: fs_mllm.patch_from_saved(model, str(plain))):
        with pytest.raises(FileNotFoundError, match=r"fs_config.json not found.*patch_model\(model, sigma=") as error:
            call()
        assert str(plain / FS_CONFIG_NAME) in str(error.value)
    with pytest.raises(ValueError, match=r"not a local folder, so a Hub repo id"):
        fs_mllm.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(FileNotFoundError, match=r"not in the HF cache"):
        fs_mllm.from_pretrained("fs-test/never-saved", cache_dir=str(tmp_path / "empty-cache"))


def test_family_mismatch_is_refused(saved_llava):
    folder, _, _ = saved_llava
    qwen, _ = build("qwen2_vl")
    with pytest.raises(ValueError, match=r"fs_config.json: saved for family 'llava', but the model .* is 'qwen2_vl'"):
        fs_mllm.patch_from_saved(qwen, str(folder))
    _edit(folder, family="qwen2_vl")  # the folder's own weights are a llava
    with pytest.raises(ValueError, match=r"saved for family 'qwen2_vl', but base model .* is 'llava'"):
        fs_mllm.from_pretrained(folder)


def test_booster_of_another_feature_size_is_refused_naming_its_file(saved_llava):
    folder, _, _ = saved_llava
    wider, _ = build_llava(config=llava_config(text_hidden=48))
    with pytest.raises(ValueError, match=r"gsb_config.json: the booster saved with this patch does not fit .*feature_dim"):
        fs_mllm.patch_from_saved(wider, str(folder))
    assert not is_patched(wider)


def test_pickle_weights_are_never_read(saved_llava):
    folder, model, _ = saved_llava
    torch.save(dict(model.state_dict()), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no .safetensors weights .*pytorch_model.bin"):
        fs_mllm.from_pretrained(folder)


def test_hub_module_never_sets_trust_remote_code():
    source = "\n".join(path.read_text() for path in sorted((REPO / "fs_mllm" / "hub").glob("*.py")))
    assert "def load_base" in source and "trust_remote_code=" not in source and "pickle.load" not in source and "torch.load" not in source


# ---------------------------------------------------------------------------------------------
# save refusals
# ---------------------------------------------------------------------------------------------

def test_save_refuses_what_it_cannot_reload(tmp_path):
    model, _ = build("llava")
    with pytest.raises(ValueError, match=r"not patched"):
        fs_mllm.save_pretrained(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForImageTextToText

    local = AutoModelForImageTextToText.from_pretrained(tmp_path / "base")
    patch_model(local, sigma=0.25, image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match=r"local folder .* not a Hub repo; pass base_model=.*include_weights=True"):
        fs_mllm.save_pretrained(local, tmp_path / "b")

    class Custom:
        def check_compatible(self, feature_dim, sigma):
            pass

        def denoise(self, pixels01, sigma):
            return pixels01

    patch_model(local, sigma=0.25, image_mean=MEAN, image_std=STD, booster=Custom())
    with pytest.raises(ValueError, match=r"Custom\) has no save_pretrained"):
        fs_mllm.save_pretrained(local, tmp_path / "c", include_weights=True)
    with pytest.warns(UserWarning, match=r"no revision known .*revision="):
        patch_model(local, sigma=0.25, image_mean=MEAN, image_std=STD)
        fs_mllm.save_pretrained(local, tmp_path / "d", base_model="someone/tiny-llava")
    assert read_saved_patch(tmp_path / "d" / FS_CONFIG_NAME).base_revision is None


def test_saving_again_without_a_booster_removes_the_old_booster(saved_llava):
    folder, model, _ = saved_llava
    patch_model(model, sigma=0.25, n_samples=4, seed=7, image_mean=MEAN, image_std=STD)
    fs_mllm.save_pretrained(model, folder, include_weights=True)
    assert not (folder / "gsb.safetensors").exists() and get_fs_state(fs_mllm.from_pretrained(folder)).booster is None


# ---------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------

RESULTS = {
    "certified_fcsb": {"0.0625": 0.81, "0.125": 0.7123},
    "attacks": [{"attack": "transfer linf 16/255", "variant": "FS+GSB", "success_rate": 0.05},
                {"attack": "adaptive l2 0.5", "variant": "FS+GSB", "success_rate": 0.125}],
    "images": 16, "dataset": "fs-synthetic-heldout", "n": 1000, "alpha": 0.001,
    "command": "fs-mllm certify --model fs-mini-llava --n 1000",
}


def test_card_renders_settings_measured_numbers_and_hub_metadata(tmp_path):
    from huggingface_hub import ModelCard

    model, _ = patched("llava")
    folder = fs_mllm.save_pretrained(model, tmp_path / "saved", base_model="someone/tiny-llava", revision="a" * 40,
                                     results=RESULTS, license="apache-2.0", repo_id="someone/tiny-llava-fs")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "fs-mllm" and card.data.base_model == "someone/tiny-llava"
    assert card.data.license == "apache-2.0" and {"fs-mllm", "certified-robustness", "llava"} <= set(card.data.tags)
    text = card.text
    assert "| sigma (noise std, [0,1] pixel space) | 0.25 |" in text and "| n0 (noisy copies per `generate()`) | 4 |" in text
    assert "| 0.0625 | 0.8100 |" in text and "| 0.125 | 0.7123 |" in text
    assert "| transfer linf 16/255 | FS+GSB | 0.05 |" in text and "| adaptive l2 0.5 | FS+GSB | 0.125 |" in text
    assert "images = 16, dataset = fs-synthetic-heldout, n = 1000, alpha = 0.001" in text
    assert "Measured with `fs-mllm certify --model fs-mini-llava --n 1000`" in text
    assert f"revision `{'a' * 40}`" in text and 'fs_mllm.from_pretrained("someone/tiny-llava-fs"' in text
    assert "What the certificate means" in text and "Limitations" in text and "{" not in text.replace("{}", "")


def test_card_without_results_says_not_measured_and_bad_results_are_refused(tmp_path):
    model, _ = patched("llava", booster=False)
    folder = fs_mllm.save_pretrained(model, tmp_path / "saved", include_weights=True)
    text = (folder / "README.md").read_text()
    assert "Not measured for this upload" in text and "base_model:" not in text.split("---")[1]
    record = read_saved_patch(folder / FS_CONFIG_NAME)
    for results, message in (({"fcsb": {}}, r"unknown keys \['fcsb'\]"),
                             ({"certified_fcsb": {"0.125": 1.5}}, r"bound in \[-1, 1\]"),
                             ({"attacks": ["x"]}, r"list of rows")):
        with pytest.raises(ValueError, match=message):
            render_card(record, name="x", results=results)


# ---------------------------------------------------------------------------------------------
# push_to_hub, up to the network boundary
# ---------------------------------------------------------------------------------------------

class _RecordingHub(http.server.BaseHTTPRequestHandler):
    """Answers create-repo and YAML validation the way the Hub does, and refuses the commit (400): every
    request the real client sends is recorded, and nothing is stored anywhere."""

    requests: list = []

    def _serve(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.requests.append({"method": self.command, "path": self.path, "json": json.loads(body) if body else None,
                              "headers": {k.lower(): v for k, v in self.headers.items()}})
        if self.path == "/api/repos/create":
            code, payload = 200, {"url": f"http://127.0.0.1:{self.server.server_port}/someone/tiny-fs"}
        elif self.path == "/api/validate-yaml":
            code, payload = 200, {"errors": [], "warnings": []}
        else:
            code, payload = 400, {"error": "test server: this is not the Hub, no commit is accepted"}
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = _serve

    def log_message(self, *args):
        pass


def test_push_to_hub_refuses_offline_mode():
    model, _ = patched("llava", booster=False)
    with pytest.raises(OSError, match=r"HF_HUB_OFFLINE=1 is set"):
        fs_mllm.push_to_hub(model, "someone/tiny-fs", token="hf_not_a_real_token", include_weights=True)


def test_push_to_hub_drives_the_real_client_to_the_http_boundary(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # talks only to 127.0.0.1
    _RecordingHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    model, _ = patched("llava")
    try:
        with pytest.raises(OSError, match=rf"(?s)upload_folder to 'someone/tiny-fs' on {endpoint} failed: .*no commit is accepted"):
            fs_mllm.push_to_hub(model, "someone/tiny-fs", private=True, token="hf_not_a_real_token", endpoint=endpoint,
                                include_weights=True, results=RESULTS, commit_message="tiny push")
    finally:
        server.shutdown()
        server.server_close()
    create, validate, preupload = _RecordingHub.requests[:3]
    assert create["path"] == "/api/repos/create"
    assert create["json"] == {"name": "tiny-fs", "organization": "someone", "visibility": "private", "type": "model"}
    assert create["headers"]["authorization"] == "Bearer hf_not_a_real_token"
    assert create["headers"]["user-agent"].startswith(f"fs-mllm/{fs_mllm.__version__}")
    assert validate["path"] == "/api/validate-yaml" and "library_name: fs-mllm" in validate["json"]["content"]
    assert "| 0.125 | 0.7123 |" in validate["json"]["content"]
    assert preupload["path"] == "/api/models/someone/tiny-fs/preupload/main"
    expected = fs_mllm.save_pretrained(model, tmp_path / "same", include_weights=True, results=RESULTS, repo_id="someone/tiny-fs")
    assert sorted(f["path"] for f in preupload["json"]["files"]) == sorted(p.name for p in expected.iterdir())


def test_push_to_hub_unreachable_endpoint_is_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHub)
    port = server.server_port
    server.server_close()  # nothing listens there any more
    model, _ = patched("llava", booster=False)
    with pytest.raises(OSError, match=rf"(?s)create_repo\('someone/tiny-fs'\) on http://127.0.0.1:{port} failed: .*Connect"):
        fs_mllm.push_to_hub(model, "someone/tiny-fs", token="hf_not_a_real_token", endpoint=f"http://127.0.0.1:{port}",
                            include_weights=True)


# ---------------------------------------------------------------------------------------------
# the command line and the loader
# ---------------------------------------------------------------------------------------------

def _tiny_llava_with_processor(out: Path) -> Path:
    """A tiny LLaVA saved with a word-level tokenizer and a CLIP image processor, like a real checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    while len(vocab) < VOCAB:
        vocab["<image>" if len(vocab) == IMAGE_TOKEN else f"w{len(vocab)}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>")
    model, _ = build_llava()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_fs_mllm_save_command_writes_a_loadable_folder(tmp_path, monkeypatch, capsys):
    """The command as the installed script; its refusal and --help in-process through the same entry point
    (console_main: same parser, exit status and output)."""
    from console_script import console_in_process
    from fs_mllm.models.loading import load_model

    command = shutil.which("fs-mllm")
    if command is None:
        pytest.skip("the fs-mllm console script is not installed (pip install -e .)")
    base = _tiny_llava_with_processor(tmp_path / "base")
    booster_dir = booster_for(build("llava")[0]).save_pretrained(tmp_path / "booster")
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    out = tmp_path / "saved"
    run = subprocess.run([command, "save", "--model", str(base), "--output-dir", str(out), "--sigma", "0.3", "--n-samples", "4",
                          "--booster", str(booster_dir), "--include-weights", "--results", str(tmp_path / "results.json"),
                          "--license", "apache-2.0"], env=_child_env(tmp_path / "hf-cache"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {FS_CONFIG_NAME, "README.md", "gsb.safetensors", "model.safetensors", "tokenizer.json"} <= names
    assert names & {"preprocessor_config.json", "processor_config.json"}
    saved = read_saved_patch(out / FS_CONFIG_NAME)
    assert saved.fs_config["sigma"] == 0.3 and saved.fs_config["n_samples"] == 4 and saved.booster
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    assert saved.image_mean == pytest.approx(list(processor.image_processor.image_mean))
    assert "| 0.125 | 0.7123 |" in (out / "README.md").read_text()

    model, loaded_processor = fs_mllm.from_pretrained(out, return_processor=True)
    assert is_patched(model) and get_fs_state(model).config.sigma == 0.3 and loaded_processor is not None
    base_model, base_processor = load_model(str(out))  # --model accepts a saved folder: its base, unpatched
    assert not is_patched(base_model) and base_processor is not None

    bad = console_in_process(["save", "--model", str(base), "--output-dir", str(tmp_path / "x"), "--sigma", "-1"],
                             monkeypatch, capsys)
    assert bad.returncode != 0 and "sigma must be" in bad.stderr
    helped = console_in_process(["save", "--help"], monkeypatch, capsys)
    assert helped.returncode == 0 and "--include-weights" in helped.stdout


# ---------------------------------------------------------------------------------------------
# fs-mini-llava, the Hub way
# ---------------------------------------------------------------------------------------------

MINI_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from huggingface_hub import constants, snapshot_download
    from transformers import AutoModelForImageTextToText
    import fs_mllm
    from fs_mllm.booster.model import GaussianSmoothnessBooster
    from fs_mllm.models import mini_llava
    from fs_mllm.models.loading import load_model

    report = {}
    model, processor = load_model("fs-mini-llava")              # the main job's / the CLI's --model path
    report["name_or_path"] = model.name_or_path
    report["patched_by_load_model"] = fs_mllm.is_patched(model)
    snapshot = Path(snapshot_download("fs-mllm/fs-mini-llava", local_files_only=True))
    report["snapshot"] = str(snapshot)
    report["ref"] = (snapshot.parent.parent / "refs" / "main").read_text()
    plain = AutoModelForImageTextToText.from_pretrained("fs-mllm/fs-mini-llava")   # transformers' own resolution
    report["transformers_class"] = type(plain).__name__
    report["same_weights"] = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    smoothed = fs_mllm.from_pretrained("fs-mllm/fs-mini-llava")
    state = fs_mllm.get_fs_state(smoothed)
    shipped = GaussianSmoothnessBooster.from_pretrained(mini_llava.BOOSTER_DIR)
    report["sigma"] = state.config.sigma
    report["booster_is_shipped"] = all(torch.equal(a, b) for a, b in zip(state.booster.state_dict().values(), shipped.state_dict().values()))
    report["card"] = (snapshot / "README.md").read_text()

    # a retrained booster (read from BOOSTER_DIR, as another engineer may replace it) becomes a new snapshot
    with torch.no_grad():
        for p in shipped.parameters():
            p.mul_(0.5)
    mini_llava.BOOSTER_DIR = shipped.save_pretrained(Path(sys.argv[2]))
    again = fs_mllm.from_pretrained("fs-mllm/fs-mini-llava")
    new = Path(snapshot_download("fs-mllm/fs-mini-llava", local_files_only=True))
    report["new_snapshot"] = new.name != snapshot.name and (new.parent.parent / "refs" / "main").read_text() == new.name
    report["new_booster"] = all(torch.equal(a, b) for a, b in zip(fs_mllm.get_fs_state(again).booster.state_dict().values(),
                                                                  shipped.state_dict().values()))
    Path(sys.argv[1]).write_text(json.dumps(report))
""")


def test_fs_mini_llava_loads_through_the_hf_cache_offline(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("gguf")
    cache = tmp_path / "hf-cache"
    (tmp_path / "child.py").write_text(MINI_CHILD)
    run = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "report.json"), str(tmp_path / "retrained")],
                         env=_child_env(cache), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["name_or_path"] == MINI_LLAVA_REPO and not report["patched_by_load_model"]
    assert report["snapshot"].startswith(str(cache / "models--fs-mllm--fs-mini-llava" / "snapshots"))
    assert report["ref"] == Path(report["snapshot"]).name
    assert report["transformers_class"] == "LlavaForConditionalGeneration" and report["same_weights"]
    assert report["sigma"] == 0.25 and report["booster_is_shipped"]
    assert "library_name: fs-mllm" in report["card"] and "# fs-mini-llava" in report["card"]
    assert report["new_snapshot"] and report["new_booster"]


def test_eval_fs_gsb_defaults_to_the_booster_saved_with_the_model(saved_llava, tmp_path):
    """`fs-mllm eval --model <saved folder> --variants base,fs+gsb` needs no --booster: the saved one is used."""
    from fs_mllm.evaluation.settings import EvalSettings

    folder, _, _ = saved_llava
    settings = EvalSettings(model=str(folder), variants="base,fs+gsb")
    assert settings.booster == str(folder.resolve())
    without = fs_mllm.save_pretrained(patched("llava", booster=False)[0], tmp_path / "plain", include_weights=True)
    with pytest.raises(ValueError, match="booster"):
        EvalSettings(model=str(without), variants="base,fs+gsb")


def test_a_model_folder_with_missing_weights_is_refused_not_filled_with_random_values(saved_llava):
    folder, _, _ = saved_llava
    weights = folder / "model.safetensors"
    state = load_file(weights)
    dropped = sorted(k for k in state if "multi_modal_projector" in k)
    assert dropped
    save_file({k: v for k, v in state.items() if k not in dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="incomplete") as refused:
        fs_mllm.from_pretrained(folder)
    assert str(folder) in str(refused.value) and "multi_modal_projector" in str(refused.value)


@pytest.mark.parametrize("damage", ["nan", "int64", "float16"])
def test_booster_weights_that_are_not_float_or_not_finite_are_refused(tmp_path, damage):
    """Casting integers into float weights, or loading NaN, would only show at generate (if at all); half
    precision is an upcast without loss and loads."""
    booster = GaussianSmoothnessBooster(GSBConfig(feature_dim=32, denoiser_channels=4, denoiser_depth=2, mapper_hidden=16,
                                                  mapper_layers=1, sigma_embed_dim=8))
    booster.save_pretrained(tmp_path / "b")
    path = tmp_path / "b" / "gsb.safetensors"
    state = load_file(path)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = {"nan": lambda t: torch.full_like(t, float("nan")), "int64": lambda t: t.long(),
                   "float16": lambda t: t.half()}[damage](state[name])
    save_file(state, path)
    if damage == "float16":
        loaded = GaussianSmoothnessBooster.from_pretrained(tmp_path / "b")
        assert torch.equal(loaded.state_dict()[name], state[name].float())
        return
    with pytest.raises(ValueError, match=name) as refused:
        GaussianSmoothnessBooster.from_pretrained(tmp_path / "b")
    assert str(path) in str(refused.value)
