"""The neoxko command line, run as a user runs it."""

import json
import subprocess
import sys

from neoxko import generate, load_model, load_tokenizer
from neoxko.generate import Sampling


def neoxko(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neoxko", *args], capture_output=True, text=True, input=stdin)


def test_generate_streams_the_same_text_as_the_api(model_dir):
    out = neoxko("generate", "--model", str(model_dir), "--max-new-tokens", "20", "--temperature", "0.7",
                 "--top-p", "0.9", "--seed", "5", "대한민국은")
    assert out.returncode == 0, out.stderr
    expected = generate(load_model(model_dir), load_tokenizer(model_dir), "대한민국은", 20,
                        Sampling(temperature=0.7, top_k=40, top_p=0.9, seed=5))
    assert out.stdout == expected + "\n"


def test_generate_reads_the_prompt_from_stdin(model_dir):
    args = ("generate", "--model", str(model_dir), "--max-new-tokens", "8", "--temperature", "0")
    direct = neoxko(*args, "오늘").stdout
    assert neoxko(*args, stdin="오늘\n").stdout == direct  # as `echo 오늘 |` sends it


def test_version_and_a_help_that_does_not_load_torch():
    out = neoxko("--version")
    assert out.returncode == 0 and out.stdout.strip() == "neoxko 0.2.0"
    probe = subprocess.run([sys.executable, "-c", "import sys; from neoxko.cli import build_parser; build_parser(); "
                            "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "False", probe.stderr


def test_info_json(model_dir):
    out = neoxko("info", "--model", str(model_dir), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["parameters"] == sum(p.numel() for p in load_model(model_dir).parameters())
    assert info["config"]["hidden_size"] == 64 and info["preset"] is None


def test_info_recognises_a_preset(tmp_path):
    from neoxko.config import PRESETS

    PRESETS["polyglot-ko-1.3b"].save(tmp_path / "config.json")
    out = neoxko("info", "--model", str(tmp_path))
    assert "polyglot-ko-1.3b" in out.stdout and "1,331,810,304" in out.stdout


def test_errors_are_one_line_without_traceback(tmp_path, model_dir):
    out = neoxko("info", "--model", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.startswith("neoxko: error:") and "has no config.json" in out.stderr
    assert "Traceback" not in out.stderr
    out = neoxko("generate", "--model", str(model_dir), "--top-p", "2", "hi")
    assert out.returncode == 2 and "top_p must be in (0, 1]" in out.stderr and "Traceback" not in out.stderr


def test_io_errors_and_closed_pipes_are_one_line(tmp_path):
    out = neoxko("data", "pii-eval", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2 and out.stderr.strip() == f"neoxko: error: No such file or directory: {tmp_path / 'nope.jsonl'}"
    (tmp_path / "big.txt").write_text("내 번호는 010-1234-5678 이야\n" * 100000, encoding="utf-8")
    piped = subprocess.run(["bash", "-c", f"{sys.executable} -m neoxko data pii {tmp_path / 'big.txt'} | head -1"],
                           capture_output=True, text=True)
    assert piped.stdout == "내 번호는 <|tel|> 이야\n" and piped.stderr == ""
    (tmp_path / "afile").write_text("")
    out = neoxko("train", "max_steps=1", f"out_dir={tmp_path / 'afile' / 'run'}", "model=" + json.dumps(
        {"vocab_size": 384, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 64}), "data=[]")
    assert out.returncode == 2 and out.stderr.startswith("neoxko: error: Not a directory:") and "Traceback" not in out.stderr


def test_an_unreachable_hub_dataset_is_reported_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "neoxko", "data", "prepare", "--hf-dataset", "someone/no-such-data",
                          "--output", str(tmp_path / "out"), "--tokenizer", "ko-small"], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "cannot open the dataset 'someone/no-such-data'" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


def test_train_and_finetune_help_list_their_settings_with_defaults_and_meaning():
    import dataclasses
    import subprocess
    import sys

    from neoxko.finetune.config import FinetuneConfig
    from neoxko.train.config import TrainConfig

    for command, config in (("train", TrainConfig), ("finetune", FinetuneConfig)):
        out = subprocess.run([sys.executable, "-m", "neoxko", command, "--help"], capture_output=True, text=True,
                             check=True).stdout
        assert "settings (key=value after the command, or keys of the --config YAML file)" in out
        for field in dataclasses.fields(config):  # every setting is listed, with the default the class really has
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            assert f"  {field.name}={default!r}" in out, (command, field.name)
    train_help = subprocess.run([sys.executable, "-m", "neoxko", "train", "--help"], capture_output=True,
                                text=True).stdout
    assert "global_batch=32                    sequences per optimizer step over all ranks" in train_help
    assert "max_steps=1000\n" in train_help  # ("# optimisation" names a group; it is no setting's meaning)
