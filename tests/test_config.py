import pytest

from openvino_reranker.config import OPTIONS, ShapeBucket, load_config
from openvino_reranker.errors import EXIT_CONFIG, StartupError


def test_defaults_match_the_design():
    c = load_config([], {})
    assert (c.host, c.port, c.device) == ("127.0.0.1", 18818, "NPU")
    assert c.model == "cross-encoder/ms-marco-MiniLM-L6-v2" and c.model_dir == "" and c.model_file == ""
    assert c.npu_busy_path == "/sys/class/accel/accel0/device/npu_busy_time_us"
    assert c.max_length == 0 and c.shape_mode == "auto" and c.is_npu and c.static_shapes


def test_env_is_read_and_flags_win():
    env = {"OPENVINO_RERANKER_PORT": "9000", "OPENVINO_RERANKER_DEVICE": "cpu", "OPENVINO_RERANKER_HOST": "::1"}
    c = load_config([], env)
    assert (c.port, c.device, c.host) == (9000, "CPU", "::1")
    assert not c.is_npu and not c.static_shapes
    c = load_config(["--port", "9100", "--device", "GPU.1"], env)
    assert (c.port, c.device) == (9100, "GPU.1")


def test_every_option_has_a_flag_and_an_env_var():
    for opt in OPTIONS:
        assert opt.flag == "--" + opt.name.replace("_", "-")
        assert opt.env == "OPENVINO_RERANKER_" + opt.name.upper()
        load_config([opt.flag, opt.default], {})  # every default parses through its own flag


@pytest.mark.parametrize("argv, env, needle", [
    (["--port", "70000"], {}, "--port"),
    (["--port", "abc"], {}, "not an integer"),
    ([], {"OPENVINO_RERANKER_PORT": "-1"}, "OPENVINO_RERANKER_PORT"),
    (["--device", "TPU"], {}, "not a device"),
    (["--buckets", "8x"], {}, "ROWSxLENGTH"),
    (["--buckets", "8x16384"], {}, "length 8..8192"),
    (["--max-length", "8193"], {}, "--max-length"),
    (["--model", " "], {}, "model: empty"),
    (["--shape-mode", "sometimes"], {}, "auto, static, dynamic"),
    (["--log-level", "loud"], {}, "DEBUG"),
    (["--no-such-flag"], {}, "unrecognized"),
    (["--host", ""], {}, "host"),
])
def test_bad_values_stop_startup_with_one_line(argv, env, needle):
    with pytest.raises(StartupError) as info:
        load_config(argv, env)
    assert info.value.exit_code == EXIT_CONFIG
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_buckets_are_sorted_and_deduplicated():
    c = load_config(["--buckets", "8x128, 1x64,8x128,4x512"], {})
    assert c.buckets == (ShapeBucket(1, 64), ShapeBucket(8, 128), ShapeBucket(4, 512))


@pytest.mark.parametrize("device, mode, static", [
    ("NPU", "auto", True), ("AUTO:NPU,CPU", "auto", True), ("CPU", "auto", False), ("CPU", "static", True),
    ("NPU", "dynamic", False),
])
def test_shape_mode(device, mode, static):
    assert load_config(["--device", device, "--shape-mode", mode], {}).static_shapes is static


def test_model_dir_is_the_model_and_cannot_be_given_with_model(tmp_path):
    assert load_config(["--model-dir", str(tmp_path)], {}).model == str(tmp_path)
    assert load_config([], {"OPENVINO_RERANKER_MODEL_DIR": str(tmp_path)}).model == str(tmp_path)
    with pytest.raises(StartupError, match="either model or model_dir") as err:
        load_config(["--model", "org/name", "--model-dir", str(tmp_path)], {})
    assert err.value.exit_code == EXIT_CONFIG


def test_an_export_in_the_old_default_dir_keeps_being_served(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config([], {}).model == "cross-encoder/ms-marco-MiniLM-L6-v2"  # nothing there: the Hub default
    legacy = tmp_path / ".cache/openvino-models/rerankers/ms-marco-MiniLM-L6-v2-int8-ov"
    legacy.mkdir(parents=True)
    (legacy / "openvino_model.xml").write_text("<net/>")
    assert load_config([], {}).model == str(legacy)
    # naming a model, even the default one, serves what was named
    assert load_config(["--model", "cross-encoder/ms-marco-MiniLM-L6-v2"], {}).model == \
        "cross-encoder/ms-marco-MiniLM-L6-v2"


# ---- OPENVINO_RERANKER_* variables that are not options (issue 19.4)


def test_unknown_variables_are_found_and_the_closest_option_named():
    from openvino_reranker.config import describe_unknown_variable, unknown_variables

    env = {"OPENVINO_RERANKER_DEVIC": "CPU", "OPENVINO_RERANKER_PORT": "1", "openvino_reranker_log_level": "DEBUG",
           "OPENVINO_RERANKER_ZQXJW": "1", "HF_HUB_OFFLINE": "1", "OPENVINO_RERANKER_STRICT_ENV": "0"}
    assert unknown_variables(env) == ["OPENVINO_RERANKER_DEVIC", "OPENVINO_RERANKER_ZQXJW",
                                      "openvino_reranker_log_level"]
    assert describe_unknown_variable("OPENVINO_RERANKER_DEVIC") == \
        "OPENVINO_RERANKER_DEVIC is not an option (did you mean OPENVINO_RERANKER_DEVICE?)"
    assert "did you mean OPENVINO_RERANKER_LOG_LEVEL?" in describe_unknown_variable("openvino_reranker_log_level")
    assert "did you mean OPENVINO_RERANKER_MAX_DOCUMENTS?" in describe_unknown_variable("OPENVINO_RERANKER_MAX_DOCS")
    assert "no option has a similar name" in describe_unknown_variable("OPENVINO_RERANKER_ZQXJW")


def test_unknown_variables_are_ignored_by_default_and_fatal_with_strict_env():
    env = {"OPENVINO_RERANKER_DEVIC": "CPU"}
    assert load_config([], env).device == "NPU"  # ignored (startup warns: tests/test_startup.py)
    for argv, strict_env in ((["--strict-env"], {}), ([], {"OPENVINO_RERANKER_STRICT_ENV": "true"}),
                             (["--strict-env", "true"], {})):
        with pytest.raises(StartupError) as info:
            load_config(argv, {**env, **strict_env})
        message = str(info.value)
        assert info.value.exit_code == EXIT_CONFIG and "\n" not in message
        assert "OPENVINO_RERANKER_DEVIC is not an option (did you mean OPENVINO_RERANKER_DEVICE?)" in message
        assert "--strict-env" in message
    assert load_config(["--strict-env"], {"OPENVINO_RERANKER_DEVICE": "CPU"}).strict_env is True  # all known
    assert load_config(["--strict-env", "false"], {**env, "OPENVINO_RERANKER_STRICT_ENV": "1"}).strict_env is False
