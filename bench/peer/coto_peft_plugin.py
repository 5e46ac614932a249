"""A pytest plugin that runs PEFT's own test suite against ``coto_kernels.patch``.

Loaded with ``-p coto_peft_plugin`` (this folder on ``PYTHONPATH``). ``COTO_PEER_MODE`` chooses what it does:

- ``none``: nothing is patched (the baseline run); outcomes are still recorded.
- ``off``: every model PEFT builds or loads is patched with ``coto_kernels.patch(model, schedule="off",
  seed=0)``: every adapter on, fused where the kernels apply. The test must behave exactly as unpatched.
- ``schedule``: patched with the real CoTo schedule (``initial_p=0.1``, a 4-step ramp): in training mode
  adapters are switched off at random, which legitimately changes what a training test sees. A test in which
  no forward ran in training mode with an adapter off must still pass; the others must not crash.

"Every model PEFT builds": the outermost ``PeftModel`` / ``PeftMixedModel`` / tuner (``LoraModel`` ...) whose
``__init__`` returns (``get_peft_model``, ``PeftModel.from_pretrained``, direct construction), and the model
``inject_adapter_in_model`` returns. Models without LoRA layers are left alone.

``COTO_PEER_SELECT`` (JSON ``{test file: regex or null}``) deselects every other test.

``COTO_PEER_OUT`` names a JSON lines file; one line per test: ``nodeid``, ``outcome`` (passed / failed /
skipped), ``error`` (exception type), ``message`` (first line), ``gated_off`` (a training forward ran with an
adapter off). Tests that need the Hugging Face Hub (offline here) are turned into skips with that reason.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import warnings

import pytest

MODE = os.environ.get("COTO_PEER_MODE", "off")
MODES = ("none", "off", "schedule")
if MODE not in MODES:
    raise ValueError(f"COTO_PEER_MODE must be one of {MODES}, got {MODE!r}")

HUB_REASON = "needs the Hugging Face Hub (downloads a model or adapter; no network here)"
_HUB_MARKERS = (
    "offline mode", "HF_HUB_OFFLINE", "couldn't connect", "LocalEntryNotFoundError", "Cannot reach",
    "We couldn't connect", "OfflineModeIsEnabled", "Max retries exceeded", "Failed to resolve",
    "Temporary failure in name resolution", "connection error", "ConnectionError",
)

_state = threading.local()
_test_flags = {"gated_off": False}


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _set_depth(value: int) -> None:
    _state.depth = value


def _noting_gated_off(base_only):
    """Wrap the gated-off path of the patched layers: remember a training forward with an adapter off."""

    @functools.wraps(base_only)
    def wrapper(layer, *args, **kwargs):
        if layer.training:
            _test_flags["gated_off"] = True
        return base_only(layer, *args, **kwargs)

    return wrapper


def _patch(model) -> None:
    from peft.tuners.lora import LoraLayer

    import coto_kernels
    from coto_kernels.layers import CoToLayerMixin

    modules = list(model.modules())
    if any(isinstance(m, CoToLayerMixin) for m in modules) or not any(
        isinstance(m, LoraLayer) and hasattr(m, "lora_A") for m in modules
    ):
        return
    options = dict(schedule="off") if MODE == "off" else dict(schedule="linear", initial_p=0.1, total_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the patch-time notice about unfused layers is not the test's business
        coto_kernels.patch(model, seed=0, **options)


def _patch_outermost(fn):
    """Wrap a constructor or builder: patch what the outermost call built (``result`` or ``self``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _set_depth(_depth() + 1)
        try:
            result = fn(*args, **kwargs)
        finally:
            _set_depth(_depth() - 1)
        if _depth() == 0:
            target = args[0] if fn.__name__ == "__init__" else result
            _patch(target)
        return result

    wrapper.__coto_wrapped__ = True
    return wrapper


def _install() -> None:
    import peft
    import peft.mapping
    import peft.mixed_model
    import peft.peft_model
    from peft.tuners.tuners_utils import BaseTuner

    classes = [peft.peft_model.PeftModel, peft.mixed_model.PeftMixedModel, BaseTuner]
    classes += [c for c in vars(peft.peft_model).values() if isinstance(c, type)
                and issubclass(c, peft.peft_model.PeftModel)]
    for cls in set(classes):
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__coto_wrapped__", False):
            cls.__init__ = _patch_outermost(init)
    from coto_kernels.layers import CoToLayerMixin

    CoToLayerMixin._base_only = _noting_gated_off(CoToLayerMixin._base_only)
    inject = _patch_outermost(peft.mapping.inject_adapter_in_model)
    peft.mapping.inject_adapter_in_model = inject
    peft.inject_adapter_in_model = inject


def _stay_offline() -> None:
    """Make PEFT's ``testing_utils.hub_online_once`` keep the Hub offline under ``HF_HUB_OFFLINE=1``.

    On the first use of a model id it patches huggingface_hub and transformers back ONLINE (so that the first
    download can happen), which offline means ~45 s of connection retries per test before the test fails on
    the Hub and the plugin turns it into a skip. Patched before the test modules import the name."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return
    import contextlib
    import sys
    from unittest import mock

    sys.path.insert(0, os.getcwd())  # the peft source folder, whose tests/ is a package
    try:
        import tests.testing_utils as testing_utils
    except ImportError:
        return

    @contextlib.contextmanager
    def offline_hub_online_once(model_id: str):
        with mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", True), \
                mock.patch("transformers.utils.hub.is_offline_mode", lambda: True):
            yield

    testing_utils.hub_online_once = offline_hub_online_once


def pytest_configure(config):
    config.addinivalue_line("markers", "regression: PEFT's regression suite")
    _stay_offline()
    if MODE != "none":
        _install()


def selected(nodeid: str, selection: dict[str, str | None]) -> bool:
    """Whether ``nodeid`` is in ``selection`` ({test file: regex on the test id, or None for every test})."""
    path = nodeid.split("::", 1)[0]
    if path not in selection:
        return False
    pattern = selection[path]
    return pattern is None or re.search(pattern, nodeid) is not None


def pytest_collection_modifyitems(config, items):
    selection = json.loads(os.environ.get("COTO_PEER_SELECT", "null"))
    if selection is not None:
        dropped = [item for item in items if not selected(item.nodeid, selection)]
        items[:] = [item for item in items if selected(item.nodeid, selection)]
        config.hook.pytest_deselected(items=dropped)
    skip = pytest.mark.skip(reason="PEFT's regression suite (compares against artifacts on the Hub)")
    for item in items:
        if "regression" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    _test_flags["gated_off"] = False


def _is_hub_error(excinfo) -> bool:
    text = f"{excinfo.typename}: {excinfo.value}"
    chain = excinfo.value
    while chain is not None:
        text += f" {type(chain).__name__}: {chain}"
        chain = chain.__cause__ or chain.__context__
    return any(marker.lower() in text.lower() for marker in _HUB_MARKERS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and _is_hub_error(call.excinfo):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {HUB_REASON}")
    excinfo = call.excinfo
    if report.when == "call" or report.failed or (report.when == "setup" and report.skipped):
        path = os.environ.get("COTO_PEER_OUT")
        if not path:
            return
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]
        elif excinfo is not None:
            message = str(excinfo.value).strip().splitlines()[0][:300] if str(excinfo.value).strip() else ""
        record = {
            "nodeid": item.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "error": excinfo.typename if excinfo is not None and report.failed else None,
            "message": message,
            "gated_off": _test_flags["gated_off"],
        }
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
