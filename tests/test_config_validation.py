"""The paper's configs, config-key checks, and the dataset checks of the training pipeline."""

from __future__ import annotations

import lzma
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import CONFIG_DIR, ConfigError, build_config
from pipeline.data import BUNDLED, DatasetError, validate_atomic_file
from pipeline.registry import get_model_class
from pipeline.runner import main, train
from pipeline.validate import known_keys, validate_config

SHARED = Path(__file__).resolve().parents[2] / "shared"
BEAUTY = SHARED / "datasets" / "amazon-beauty" / "amazon-beauty.inter.xz"
HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
RUN_CONFIGS = sorted(CONFIG_DIR.glob("config4*.yaml"))
PAPER = ["beauty_64d", "kuai_64d", "movie_64d", "movie_256d", "steam_64d"]

# ../shared/TIM4REC_SPEC.md, "Official configurations" (is_time on everywhere, by design).
OFFICIAL = {
    "beauty_64d": dict(dataset="amazon-beauty", hidden_size=64, d_state=32, head_dim=32,
                       MAX_ITEM_LIST_LENGTH=50, dropout_prob=0.4, time_drop_out=0.0,
                       norm_eps=1e-5, p2p_residual=True, is_kai_ming_init=False,
                       train_batch_size=2048, eval_batch_size=4096, learning_rate=1e-3,
                       stopping_step=20),
    "kuai_64d": dict(dataset="kuairand", hidden_size=64, d_state=32, head_dim=32,
                     MAX_ITEM_LIST_LENGTH=50, dropout_prob=0.2, time_drop_out=0.0,
                     norm_eps=1e-10, p2p_residual=False, is_kai_ming_init=False,
                     train_batch_size=2048, eval_batch_size=4096, learning_rate=1e-3,
                     stopping_step=10),
    "movie_64d": dict(dataset="ml-1m", hidden_size=64, d_state=32, head_dim=32,
                      MAX_ITEM_LIST_LENGTH=200, dropout_prob=0.2, time_drop_out=0.2,
                      norm_eps=1e-12, p2p_residual=False, is_kai_ming_init=True,
                      train_batch_size=2048, eval_batch_size=4096, learning_rate=1e-3,
                      stopping_step=20),
    "movie_256d": dict(dataset="ml-1m", hidden_size=256, d_state=64, head_dim=128,
                       MAX_ITEM_LIST_LENGTH=200, dropout_prob=0.2, time_drop_out=0.2,
                       norm_eps=1e-12, p2p_residual=False, is_kai_ming_init=True,
                       train_batch_size=512, eval_batch_size=1024, learning_rate=1e-3,
                       stopping_step=20),
    "steam_64d": dict(dataset="steam", hidden_size=64, d_state=32, head_dim=32,
                      MAX_ITEM_LIST_LENGTH=50, dropout_prob=0.2, time_drop_out=0.2,
                      norm_eps=1e-10, p2p_residual=False, is_kai_ming_init=True,
                      train_batch_size=2048, eval_batch_size=4096, learning_rate=5e-4,
                      stopping_step=20),
}  # fmt: skip
SHARED_VALUES = dict(num_layers=2, expand=2, d_conv=4, chunk_size=32, learner="adam",
                     weight_decay=0.0, epochs=300, eval_step=1,
                     loss_type="CE", metrics=["Hit", "NDCG", "MRR"], topk=[10, 20, 50],
                     valid_metric="NDCG@10", seed=2020, is_time=True)  # fmt: skip
RAW_FILE = {
    "amazon-beauty": "ratings_Beauty.csv",
    "kuairand": "KuaiRand-Pure/data/",
    "ml-1m": "ratings.dat",
    "steam": "steam_reviews.json.gz",
}


def tim4rec_config(overrides: dict | None = None, files: list[Path] | None = None):
    overrides = {"dataset": "ml-100k", **(overrides or {})}
    return build_config(get_model_class("TiM4Rec"), files or [], overrides)


def config_error(overrides: dict, files: list[Path] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config(tim4rec_config(overrides, files))
    return str(caught.value)


# --- the paper's configurations ---


def test_every_paper_config_is_shipped():
    assert {p.stem for p in RUN_CONFIGS} == {f"config4{n}" for n in PAPER} | {"config4ml-100k"}


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_values(name):
    config = build_config(get_model_class("TiM4Rec"), [CONFIG_DIR / f"config4{name}.yaml"], {})
    validate_config(config)
    for key, value in {**OFFICIAL[name], **SHARED_VALUES}.items():
        assert config[key] == value, key
    assert config["train_neg_sample_args"]["distribution"] == "none"  # RecBole's form of None
    item = "product_id" if name == "steam_64d" else "item_id"
    assert config["ITEM_ID_FIELD"] == item
    assert config["load_col"] == {"inter": ["user_id", item, "timestamp"]}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_every_key_has_a_comment(path):
    for line in path.read_text().splitlines():
        if re.match(r"^[A-Za-z_]\w*\s*:", line):
            assert "#" in line, f"{path.name}: no comment on {line!r}"
    if path.stem != "config4ml-100k":
        text = path.read_text()
        assert "official KuaiRand and ML-1M-256d files had it off" in text


# --- config keys: unknown, wrong type, inconsistent ---


def test_unknown_key_from_override_suggests_closest():
    message = config_error({"hiden_size": 64})
    assert "unknown config key 'hiden_size' (in --hiden_size=... override)" in message
    assert "did you mean 'hidden_size'?" in message


def test_unknown_key_is_matched_case_insensitively():
    assert "did you mean 'MAX_ITEM_LIST_LENGTH'?" in config_error({"max_item_list_length": 20})


def test_unknown_key_in_config_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("dataset: ml-100k\nlearning_rat: 0.01\n")
    message = config_error({}, [path])
    assert f"unknown config key 'learning_rat' (in {path})" in message
    assert "did you mean 'learning_rate'?" in message


def test_unknown_key_without_a_close_match():
    assert "remove it or fix its name" in config_error({"zzzz_qqqq": 1})


def test_keys_of_recbole_and_other_models_are_known():
    known = known_keys()
    # RecBole: settings, internal keys, other models' keys (SASRec, BERT4Rec)
    for key in ("gpu_id", "nproc", "n_heads", "mask_ratio", "inner_size", "benchmark_filename"):
        assert key in known, key
    # every key of every project yaml (config/, config/model/, baseline/)
    root = CONFIG_DIR.parent
    for path in [*CONFIG_DIR.rglob("*.yaml"), *(root / "baseline").rglob("*.yaml")]:
        data = yaml.safe_load(path.read_text()) or {}
        assert set(data) <= known, path
    # and a TiM4Rec run may carry them (e.g. a shared sweep file)
    validate_config(tim4rec_config({"n_heads": 2, "gpu_id": "0"}))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"hidden_size": "wide"}, "config key hidden_size must be int, got 'wide' (str)"),
        ({"is_time": 1}, "config key is_time must be bool, got 1 (int)"),
        ({"fused_optimizer": "yes"}, "config key fused_optimizer must be bool, got 'yes'"),
        ({"keep_host_memory": 0}, "config key keep_host_memory must be bool, got 0 (int)"),
        ({"learning_rate": "fast"}, "config key learning_rate must be float or int, got 'fast'"),
        ({"dropout_prob": 1.5}, "dropout_prob is a dropout probability in [0, 1), got 1.5"),
        ({"hidden_size": 0}, "config key hidden_size must be positive, got 0"),
        (
            {"triton_autotune": "off"},
            "config key triton_autotune must be one of pinned, search, got 'off'",
        ),
        (
            {"time_encoding": "log"},
            "time_encoding must be one of paper, corrected, causal, got 'log'",
        ),
        (
            {"product_kernel": "cutlass"},
            "config key product_kernel must be one of cublas, triton, got 'cutlass'",
        ),
    ],
)
def test_wrong_type_or_value(overrides, expected):
    assert expected in config_error(overrides)


def test_head_dim_must_divide_inner_width():
    message = config_error({"hidden_size": 64, "head_dim": 48})
    assert "head_dim (48) must divide expand * hidden_size (2 * 64 = 128)" in message


def test_max_item_list_length_at_least_two():
    message = config_error({"MAX_ITEM_LIST_LENGTH": 1})
    assert "MAX_ITEM_LIST_LENGTH must be >= 2 (a history and a target), got 1" in message


# --- the pipeline's checks on the atomic file and the dataset ---


def write_inter(folder: Path, name: str, text: str) -> Path:
    (folder / name).mkdir(parents=True, exist_ok=True)
    path = folder / name / f"{name}.inter"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def base_config():
    return tim4rec_config()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", r"the file is empty"),
        ("user_id\titem_id\ttimestamp\n1\t2\t3\n", r"header column 1 'user_id' is not RecBole's"),
        (
            "user_id:token\titem_id:token\trating:float\n1\t2\t1\n",
            r"no 'timestamp' column: TiM4Rec needs .* Columns found: user_id:token, "
            r"item_id:token, rating:float",
        ),
        (f"{HEADER}\n1\t2\t1\t7\n1\t3\t1\tx7\n", r"line 3: timestamp is 'x7', not a number"),
        (f"{HEADER}\n1\t2\t1\t\n", r"line 2: timestamp is empty or NaN"),
        (f"{HEADER}\n", r"holds no interactions"),
        (
            "user_id:token\tmovie:token\ttimestamp:float\n1\t2\t3\n",
            r"lacks column\(s\) item_id .* Columns found: user_id:token, movie:token",
        ),
    ],
    ids=["empty", "header", "no-time", "text-time", "nan-time", "no-rows", "no-item"],
)
def test_pipeline_checks_atomic_file(tmp_path, base_config, text, expected):
    path = write_inter(tmp_path, "bad", text)
    with pytest.raises(DatasetError, match=expected):
        validate_atomic_file(path, base_config)


def test_bad_file_stops_training_with_exit_2(tmp_path, capsys):
    write_inter(tmp_path, "bad", f"{HEADER}\n1\t2\t1\tnan\n")
    argv = ["--dataset=bad", f"--data_path={tmp_path}", f"--checkpoint_dir={tmp_path / 'ck'}"]
    assert main("TiM4Rec", argv) == 2
    assert "error: " in capsys.readouterr().err


def test_dataset_left_empty_by_five_core(tmp_path):
    rows = "".join(f"{u}\t{i}\t1\t{u + i}\n" for u in range(3) for i in range(3))
    write_inter(tmp_path, "sparse", HEADER + "\n" + rows)
    overrides = {"dataset": "sparse", "data_path": str(tmp_path), "checkpoint_dir": str(tmp_path)}
    with pytest.raises(DatasetError, match=r"'sparse' is left empty by the filters.*5-core"):
        train("TiM4Rec", [], overrides)


@pytest.mark.parametrize("name", PAPER)
def test_absent_dataset_names_prepare_command(tmp_path, capsys, name):
    config = CONFIG_DIR / f"config4{name}.yaml"
    argv = ["--config", str(config), f"--data_path={tmp_path}", f"--checkpoint_dir={tmp_path}"]
    assert main("TiM4Rec", argv) == 2
    dataset = OFFICIAL[name]["dataset"]
    err = capsys.readouterr().err
    assert f"error: dataset '{dataset}' not found" in err
    assert f"python -m datatools prepare {dataset} {RAW_FILE[dataset]} --out {tmp_path}" in err


# --- every config trains on a small real slice ---


def beauty_slice(n_users: int) -> tuple[str, list[str]]:
    lines = lzma.open(BEAUTY, "rt").read().splitlines()
    users: set[str] = set()
    rows = []
    for row in lines[1:]:
        user = row.split("\t", 1)[0]
        if user not in users:
            if len(users) == n_users:
                break
            users.add(user)
        rows.append(row)
    return lines[0], rows


@pytest.mark.slow
@pytest.mark.skipif(not BEAUTY.is_file(), reason=f"needs {BEAUTY} (clone beside shared/)")
@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_config_trains_on_real_slice(tmp_path, one_thread, path):
    """One epoch on 60 Amazon Beauty users, written under the config's dataset and field
    names; each config keeps its model shape, only lengths and batches are shrunk."""
    config = build_config(get_model_class("TiM4Rec"), [path], {})
    name, item = config["dataset"], config["ITEM_ID_FIELD"]
    overrides = {}
    if name in BUNDLED:  # RecBole always reads its own copy of ml-100k: use another name
        name = overrides["dataset"] = f"{name}-slice"
    header, rows = beauty_slice(60)
    write_inter(tmp_path, name, "\n".join([header.replace("item_id", item), *rows]) + "\n")
    result = train(
        "TiM4Rec",
        [path],
        {
            **overrides,
            "data_path": str(tmp_path),
            "checkpoint_dir": str(tmp_path / "saved"),
            "epochs": 1,
            "MAX_ITEM_LIST_LENGTH": 10,
            "train_batch_size": 128,
            "eval_batch_size": 64,
            "item_inter_num_interval": "[1,inf)",  # 60 users: few items reach 5
            "show_progress": False,
            "state": "WARNING",
        },
    )
    assert result["dataset"] == name
    assert 0.0 <= result["test"]["ndcg@10"] <= 1.0
    assert Path(result["checkpoint"]).is_file()
