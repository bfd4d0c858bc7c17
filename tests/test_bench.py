"""Benchmark building blocks: loaders, partitioner, Fisher (closed form), ensembling, one tiny suite run."""

import json
from collections import Counter

import pytest
import torch
import transformers as tf
from conftest import build_model, save_model
from regmean_bench import data as D
from regmean_bench.baselines import constant, ensemble

from regmean.errors import RegmeanError
from regmean.measure.fisher import FisherFile, measure_fisher, save_fisher
from regmean.methods.fisher import fisher_average
from regmean.scoring import macro_f1, predict, score


def test_loaders_match_the_documented_counts():
    tweets = D.load("tweets")
    assert len(tweets) == 38158 and tweets.label_counts() == {"negative": 16186, "neutral": 15018, "positive": 6954}
    domains = Counter(tweets.domains)
    assert set(domains) == {"airline", "apple", "deflategate", "selfdriving", "other"}
    assert 14000 < domains["airline"] < 15500 and 9000 < domains["deflategate"] < 10000
    rt = D.load("rotten_tomatoes")
    assert len(rt) == 13905 - 14 and rt.label_names == ["fresh", "rotten", "plot"]
    assert D.load_rotten_tomatoes(sentiment_only=True).label_counts() == {"negative": 5405, "positive": 7403}
    debates = D.load("debates")
    assert len(debates) == 1122 and debates.label_counts() == {"Democratic": 348, "Moderator": 320, "Republican": 454}
    wnut = D.load("wnut")
    assert len(wnut) == 2394 and sum(map(len, wnut.texts)) == 46469 and len(wnut.label_names) == 21
    assert all(len(t) == len(y) for t, y in zip(wnut.texts, wnut.labels, strict=True))
    chat = D.load("chatterbot")
    assert all(c >= 100 for c in chat.label_counts().values())


def test_user_file_loader(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("text,label\nhello there,greet\nbye now,leave\nhi,greet\n")
    data = D.load(str(path))
    assert data.label_names == ["greet", "leave"] and data.labels == [0, 1, 0]


def test_split_is_deterministic_disjoint_and_stratified():
    data = D.load("debates")
    a, b = D.split(data, 3), D.split(data, 3)
    assert [p.texts for p in a] == [p.texts for p in b]
    train, val, test = a
    assert len(train) + len(val) + len(test) == len(data)
    for part in (train, test):
        share = part.label_counts()["Republican"] / len(part)
        assert share == pytest.approx(454 / 1122, abs=0.01)
    assert D.split(data, 4)[0].texts != train.texts


@pytest.mark.parametrize("ratio", [0.8, 0.6])
def test_noniid_partition_proportions(ratio):
    labels = [0] * 500 + [1] * 300 + [2] * 200
    (p0, p1), main = D.partition_noniid(labels, seed=7, main_ratio=ratio)
    assert set(p0).isdisjoint(p1) and sorted(p0 + p1) == list(range(1000))
    totals = Counter(labels)
    got0 = Counter(labels[i] for i in p0)
    for label, total in totals.items():
        expected = ratio if label == main else 1 - ratio
        assert got0[label] == round(expected * total)
    three, _ = D.partition_noniid(labels, seed=7, n_parts=3)
    assert sorted(sum(three, [])) == list(range(1000)) and abs(len(three[1]) - len(three[2])) <= 3
    cut, _ = D.partition_noniid(labels, seed=7, size=100)
    assert all(len(p) == 100 for p in cut)


def test_fisher_equals_the_closed_form_for_the_classifier(tmp_path):
    """For logits = W h + b: d log p_c / dW = (e_c - p) h^T, so F_W = mean_n sum_c p_c ((e_c - p) h^T)^2."""
    model = build_model("bert", "BertForSequenceClassification", seed=1)
    path = save_model(model, tmp_path / "m")
    texts = ["good flight", "terrible service and long lines", "ok"]
    data = D.TextDataset("t", texts, [0, 1, 2], ["a", "b", "c"])
    fisher = measure_fisher(path, data)
    model = tf.BertForSequenceClassification.from_pretrained(path).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    expect_w = torch.zeros_like(model.classifier.weight)
    expect_b = torch.zeros_like(model.classifier.bias)
    with torch.no_grad():
        for t in texts:
            h = model.bert(**tok([t], return_tensors="pt")).pooler_output[0]
            p = model.classifier(h).softmax(-1)
            for c in range(3):
                e = torch.nn.functional.one_hot(torch.tensor(c), 3).float() - p
                expect_w += p[c] * torch.outer(e, h) ** 2
                expect_b += p[c] * e**2
    torch.testing.assert_close(fisher["classifier.weight"], expect_w / 3, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fisher["classifier.bias"], expect_b / 3, rtol=1e-4, atol=1e-9)
    saved = FisherFile(save_fisher(fisher, path, tmp_path / "f", examples=3))
    assert torch.equal(saved.get("classifier.weight"), fisher["classifier.weight"])


@pytest.mark.parametrize("cls", ["BertForSequenceClassification", "BertForTokenClassification"])
def test_predictions_batched_by_length_equal_one_example_at_a_time(tmp_path, cls):
    path = save_model(build_model("bert", cls, seed=3), tmp_path / "m")
    model = getattr(tf, cls).from_pretrained(path).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    words = [["a", "much", "longer", "sentence", "here"], ["hi"], ["three", "words", "now"], ["two", "words"]]
    token_level = cls.endswith("TokenClassification")
    texts = words if token_level else [" ".join(w) for w in words]
    labels = [[0] * len(w) for w in words] if token_level else [0] * len(words)
    data = D.TextDataset("t", texts, labels, ["a", "b", "c"], token_level=token_level)
    got = predict(path, data, batch_size=3)
    with torch.no_grad():
        for text, logits in zip(texts, got, strict=True):
            enc = tok([text], is_split_into_words=token_level, return_tensors="pt")
            expect = model(**enc).logits[0]
            if token_level:  # each word's first sub-token
                ids = enc.word_ids(0)
                expect = expect[[p for p, w in enumerate(ids) if w is not None and (p == 0 or ids[p - 1] != w)]]
            torch.testing.assert_close(logits, expect.float(), rtol=1e-4, atol=1e-5)


def test_fisher_average():
    t = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    out = fisher_average(t, torch.ones(2), f)
    torch.testing.assert_close(out, torch.tensor([2.5, 4.0], dtype=torch.float64))  # 0/0 falls back to the mean


def test_ensemble_and_metrics():
    a = [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])]
    b = [torch.tensor([0.0, 4.0]), torch.tensor([0.0, 3.0])]
    avg = ensemble([a, b])
    torch.testing.assert_close(avg[0], torch.tensor([1.0, 2.0]))
    data = D.TextDataset("t", ["x", "y"], [1, 1], ["n", "p"])
    assert score(data, avg) == {"accuracy": 1.0, "macro_f1": 1.0}
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)
    ner = D.TextDataset("n", [["a", "b"]], [[1, 2]], ["O", "B-x", "I-x"], token_level=True)
    assert score(ner, [torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])])["entity_f1"] == 1.0


def test_the_constant_predictor_is_the_majority_label():
    data = D.TextDataset("t", list("abcde"), [2, 0, 2, 1, 2], ["a", "b", "c"])
    # predicts c everywhere: accuracy 3/5; F1 of c = 2*3 / (2*3 + 2 + 0) = 0.75, a and b score 0
    assert score(data, constant(data)) == pytest.approx({"accuracy": 0.6, "macro_f1": 0.75 / 3})
    ner = D.TextDataset("n", [["a", "b", "c"], ["d"]], [[0, 1, 0], [0]], ["O", "B-x"], token_level=True)
    logits = constant(ner)
    assert [lg.argmax(-1).tolist() for lg in logits] == [[0, 0, 0], [0]]
    assert score(ner, logits)["entity_f1"] == 0.0  # all O: no entity found


def test_the_terminal_summary_says_what_to_look_for_and_warns_near_the_constant(tmp_path):
    from regmean_bench.report import write_report
    from regmean_bench.runner import Results
    from regmean_bench.terminal import print_summary
    from rich.console import Console

    values = {"constant": (0.50, 0.40), "individual": (0.80, 0.45), "average": (0.60, 0.42), "regmean": (0.75, 0.44)}
    rows = [
        {"suite": "tasks", "seed": 0, "task": "a+b", "eval": e, "method": m, "metric": "accuracy", "value": v}
        for m, vs in values.items()
        for e, v in zip("ab", vs, strict=True)
    ]
    write_report(Results(rows, [{"suite": "tasks", "seed": 0, "step": "merge", "seconds": 1.0}], []), tmp_path, {}, [0])
    console = Console(record=True, width=200)
    print_summary(tmp_path, console)
    text = console.export_text()
    assert "constant (majority class) │ 50.0 │ 40.0 │ 45.0" in text, text
    assert "regmean                   │ 75.0 │ 44.0 │ 59.5" in text, text
    assert "RegMean 59.5, simple average 51.0, individual models 62.5, constant predictor 45.0." in text
    assert "individual is 5.0 points above the constant predictor on a+b / b (seed 0)" in text  # 45 vs 40
    assert "on a+b / a" not in text  # 80 vs 50: learned
    assert str(tmp_path / "report.md") in text and "tasks.png" in text
    # a domain's model is judged on its own domain (in:NAME), seed by seed; a method missing is left out, not "nan"
    domains = [
        ("constant", "in:apple", (0.30, 0.30)),
        ("constant", "ood:pineapple", (0.30, 0.30)),
        ("individual:apple", "in:apple", (0.60, 0.35)),  # 17.5 points above on average, 5 at seed 1
        ("individual:apple", "ood:pineapple", (0.31, 0.31)),  # not its own domain
        ("average", "in:apple", (0.40, 0.40)),
        ("average", "ood:pineapple", (0.40, 0.40)),
    ]
    rows = [
        {"suite": "domains", "seed": seed, "task": "d", "eval": e, "method": m, "metric": "macro_f1", "value": v}
        for m, e, vs in domains
        for seed, v in enumerate(vs)
    ]
    write_report(
        Results(rows, [{"suite": "domains", "seed": 0, "step": "merge", "seconds": 1.0}], []), tmp_path, {}, [0, 1]
    )
    console = Console(record=True, width=200)
    print_summary(tmp_path, console)
    text = console.export_text()
    assert "individual:apple is 5.0 points above the constant predictor on d / in:apple (seed 1)" in text, text
    assert "pineapple (seed" not in text and "nan" not in text
    assert "Found (mean macro_f1 x 100): simple average 40.0, individual models 39.2, constant predictor 30.0." in text


def test_tiny_domains_suite_end_to_end(tmp_path, monkeypatch, minilm):
    """One seed of the multi-domain suite on the real MiniLM and real tweets, shrunk to seconds."""
    from regmean_bench.run import run_bench

    monkeypatch.setenv("REGMEAN_CACHE", str(tmp_path / "cache"))
    report = run_bench(
        "domains",
        [0],
        tmp_path / "run",
        minilm,
        train_size=12,
        test_size=12,
        stats_size=12,
        fisher_size=4,
        epochs=1,
        alphas=(0.0, 1.0),
    )
    for name in ("results.json", "results.csv", "report.md", "domains.png", "domains-alpha.png", "incremental.png"):
        assert (tmp_path / "run" / name).is_file(), name
    methods = ("constant", "individual:airline", "average", "task_arithmetic", "ties", "dare", "fisher", "ensemble")
    methods += ("regmean", "regmean_plusplus")
    for method in (*methods, "regmean(alpha=1)", "mtl"):
        assert f"| {method} |" in report
    assert "ood:rotten_tomatoes" in report and "mtl-train" in report and "out of domain at least as good" in report
    assert not list((tmp_path / "run").rglob("*.safetensors")), "merged models and statistics outlive their seed"


def test_an_interrupted_run_resumes_and_other_settings_are_refused(tmp_path, monkeypatch, capsys):
    """Seeds already in results.json are kept, not rerun; a folder of other settings is refused."""
    from regmean_bench import run as R
    from regmean_bench.runner import Results

    from regmean.errors import RegmeanError

    calls = []

    def fake(seed, s):
        if seed == 1 and not calls.count(1):
            calls.append(1)
            raise KeyboardInterrupt  # the run dies during seed 1
        calls.append(seed)
        row = {"suite": "fake", "seed": seed, "task": "t", "eval": "test", "method": "average"}
        time = {"suite": "fake", "seed": seed, "step": "merge", "seconds": 1.0}
        return Results([row | {"metric": "accuracy", "value": 0.5 + seed / 10}], [time], [])

    monkeypatch.setattr(R, "SUITES", {"fake": fake})
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        R.run_bench("fake", [0, 1, 2], out, tmp_path / "base")
    assert calls == [0, 1]
    report = R.run_bench("fake", [0, 1, 2], out, tmp_path / "base")
    assert calls == [0, 1, 1, 2]  # seed 0 kept, seeds 1 and 2 run
    assert "| average | 60.0 +- 10.0 |" in report and "over 3 seed(s)" in report, report  # 50, 60, 70
    with pytest.raises(RegmeanError, match="train_size"):
        R.run_bench("fake", [0], out, tmp_path / "base", train_size=10)
    # the packaged backbone is recorded by name, so results.json resumes in another checkout (another venv path)
    default = R.run_bench("fake", [0], tmp_path / "default")
    settings = json.loads((tmp_path / "default" / "results.json").read_text())["settings"]
    assert settings["base"] == R.PACKAGED, default
    # settings added later are recorded only where not their default, so that earlier results still resume
    assert "pairs" not in settings and "device" not in settings
    demo = R._describe(R.Settings(base=tmp_path, work=tmp_path, pairs=(("tweets", "debates"),)))
    assert demo["pairs"] == [["tweets", "debates"]]
    # the demo alone starts afresh over a demo of other settings (an earlier version's preset), saying so
    monkeypatch.setattr(R, "SUITES", {"tasks": fake})
    capsys.readouterr()
    R.run_bench("demo", [0], out, tmp_path / "base")
    said = capsys.readouterr().out
    assert f"{out} holds an earlier demo of other settings: running the demo afresh" in said, said
    assert json.loads((out / "results.json").read_text())["settings"]["pairs"] == [["tweets", "rotten_tomatoes"]]


def test_claims_are_paired_differences_with_t_intervals():
    import pandas as pd
    from regmean_bench.claims import claims_markdown

    values = {  # method: value at seeds 0, 1, 2 (one eval column)
        "regmean": (0.60, 0.70, 0.65),
        "regmean_plusplus": (0.62, 0.69, 0.67),
        "average": (0.50, 0.58, 0.56),
        "fisher": (0.70, 0.80, 0.74),
        "mtl": (0.61, 0.72, 0.66),
        "individual:a": (0.50, 0.60, 0.55),
        "individual:b": (0.40, 0.50, 0.45),
    }
    rows = pd.DataFrame(
        {
            "suite": "partitions",
            "seed": seed,
            "task": "t",
            "eval": "test",
            "method": m,
            "metric": "accuracy",
            "value": v,
        }
        for m, vs in values.items()
        for seed, v in enumerate(vs)
    )
    text = claims_markdown(rows, "partitions")
    # by hand: differences (10, 12, 9): mean 10.33, sd 1.528, half-width 4.303 * 1.528 / sqrt(3) = 3.80
    assert "| above simple averaging | regmean 65.0 | average 54.7 | 3 | +10.3 [+6.5, +14.1] | holds |" in text
    # (-10, -10, -9): mean -9.67, sd 0.577, half-width 1.43
    assert "| above Fisher averaging | regmean 65.0 | fisher 74.7 | 3 | -9.7 [-11.1, -8.2] | fails |" in text
    # (2, -1, 2): mean 1, sd 1.732, half-width 4.30: spans zero
    assert "| regmean_plusplus 66.0 | regmean 65.0 | 3 | +1.0 [-3.3, +5.3] | undecided |" in text
    # (-1, -2, -1): [-2.8, +0.1], within 3 points of MTL
    assert "| mtl 66.3 | 3 | -1.3 [-2.8, +0.1] | holds |" in text
    assert "| individual:a 55.0 | 3 | +10.0 [+10.0, +10.0] | holds |" in text  # the best individual model
    one_seed = claims_markdown(rows[rows["seed"] == 0], "partitions")
    assert "| 1 | +10.0 (1 seed) | undecided |" in one_seed


def test_t_quantiles_against_the_integrated_density():
    """Each quantile leaves 2.5% in the upper tail of Student's t density, integrated numerically here."""
    import math

    from regmean_bench.claims import t_quantile

    for df in (1, 2, 3, 5, 10, 15, 16, 20, 40):
        q = t_quantile(df)
        x = torch.linspace(q, q + 4000.0, 2_000_001, dtype=torch.float64)
        log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        density = torch.exp(log_c - (df + 1) / 2 * torch.log1p(x**2 / df))
        tail = float(torch.trapezoid(density, x))
        far = math.exp(log_c) * df ** ((df + 1) / 2) / df / (q + 4000.0) ** df  # the tail beyond, to leading order
        assert abs(tail + far - 0.025) < 2e-4, (df, q, tail)


@pytest.mark.parametrize(
    ("given", "count", "seeds"),
    [
        ("11", None, [11]),
        ("7,8,9", None, [7, 8, 9]),
        ("5-9", None, [5, 6, 7, 8, 9]),
        ("0,4-6", None, [0, 4, 5, 6]),
        (None, 3, [0, 1, 2]),
        (None, None, [0]),
        ("7,", None, "not a list or range"),
        ("3", 3, "give one"),
        (None, 0, "from 1 to 1000"),
        (None, 10**6, "from 1 to 1000"),
        ("0-99999999999", None, "at most 1000 seeds"),  # sweep 6 R5: built the whole list first
        ("5000000000", None, "below 2"),
        ("0-600,1000-1600", None, "at most 1000 seeds"),
    ],
)
def test_seeds_are_seeds_and_a_count_is_its_own_option(given, count, seeds):
    """A single number is one seed (--seeds 11 is seed 11, never seeds 0-10); a count is --num-seeds."""
    from regmean_bench.run import parse_seeds

    if isinstance(seeds, str):
        with pytest.raises(RegmeanError, match=seeds):
            parse_seeds(given, count)
    else:
        assert parse_seeds(given, count) == seeds


def test_bench_on_a_device_this_machine_lacks_is_one_line(tmp_path):
    from test_bad_input import cli_fails

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cli_fails(["bench", "partitions", "--device", "cuda", "--out", tmp_path / "b"], "CUDA is not available here")
    assert not (tmp_path / "b").exists()
    cli_fails(["bench", "partitions", "--seeds", "3-1", "--out", tmp_path / "b"], "not a list or range")


def test_own_tasks_are_the_data_each_suite_trains_and_scores_its_individual_models_on(tmp_path):
    """What the recipe search probes is what the suites run: each model's training data and its own test data."""
    from regmean_bench.runner import Settings
    from regmean_bench.suites import IN_DOMAINS, PARTITION_TASKS, domain_data, own_tasks

    s = Settings(base=tmp_path, work=tmp_path, train_size=40, test_size=30, log=lambda _: None)
    domains = own_tasks("domains", 0, s)
    parts, evals = domain_data(0, s)
    assert [t.train.texts for t in domains] == [p.texts for p in parts]
    for task, name in zip(domains, IN_DOMAINS, strict=True):
        assert set(task.train.domains) == {name} and task.test.texts == evals[f"in:{name}"].texts
        assert len(task.train) == 40 and len(task.test) == 15  # in-domain tests: half the test size each
    ner = own_tasks("ner", 0, s)
    assert [len(t.train) for t in ner] == [40, 40] and ner[0].train.texts != ner[1].train.texts
    assert ner[0].test.texts == ner[1].test.texts and ner[0].train.token_level
    tasks = own_tasks("tasks", 0, s)
    assert [t.train.label_names == t.test.label_names for t in tasks] == [True] * 4
    assert len(own_tasks("partitions", 0, s)) == 2 * len(PARTITION_TASKS)


def test_seeds_kept_from_before_the_constant_predictor_get_its_rows(tmp_path):
    """Resuming results made before the constant predictor was scored adds its rows for the kept seeds: the
    majority label's share of each test set (counted here), at the suite's own test sets of that seed."""
    from regmean_bench import run as R
    from regmean_bench.suites import task_data

    out = tmp_path / "run"
    out.mkdir()
    settings = R.Settings(base=tmp_path / "base", work=out / "work", train_size=40, test_size=30)
    row = {"suite": "tasks", "seed": 0, "task": "debates+chatterbot", "eval": "debates", "method": "average"}
    earlier = {
        "settings": R._describe(settings),
        "seeds": [0],
        "rows": [row | {"metric": "accuracy", "value": 0.5}],
        "times": [{"suite": "tasks", "seed": 0, "step": "merge", "seconds": 1.0}],
        "curves": [],
    }
    (out / "results.json").write_text(json.dumps(earlier))
    R.run_bench("tasks", [0], out, tmp_path / "base", train_size=40, test_size=30)
    rows = json.loads((out / "results.json").read_text())["rows"]
    got = {r["eval"]: r["value"] for r in rows if r["method"] == "constant" and r["metric"] == "accuracy"}
    assert set(got) == {"tweets", "rotten_tomatoes", "debates", "chatterbot"}
    for task, value in got.items():
        labels = task_data(task, 0, settings)[1].labels
        assert value == pytest.approx(max(Counter(labels).values()) / len(labels)) and len(labels) == 30


def test_bench_refuses_an_output_it_cannot_use_before_any_work(tmp_path):
    """Sweep 6 R4 and R9: another results.json in --out was an internal error; --out a file was found only after
    the fine-tuning."""
    from test_bad_input import cli_fails

    (tmp_path / "file").write_text("x")
    cli_fails(["bench", "demo", "--out", tmp_path / "file"], "file: exists and is not a folder")
    cli_fails(["bench", "demo", "--out", tmp_path / "file" / "run"], "file: exists and is not a folder")
    for text in ('{"rows": []}', "not json", "[1, 2]"):
        (tmp_path / "other").mkdir(exist_ok=True)
        (tmp_path / "other" / "results.json").write_text(text)
        cli_fails(["bench", "demo", "--out", tmp_path / "other"], "not the results of a regmean bench")
        assert (tmp_path / "other" / "results.json").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "other"]
    (tmp_path / "model").mkdir()  # sweep 7 H14/H16: any non-empty folder was taken, a results.json folder too
    (tmp_path / "model" / "config.json").write_text("{}")
    cli_fails(["bench", "demo", "--out", tmp_path / "model"], "holds other files and no bench results")
    (tmp_path / "other" / "results.json").unlink()
    (tmp_path / "other" / "results.json").mkdir()
    cli_fails(["bench", "demo", "--out", tmp_path / "other"], "holds other files and no bench results")
    base = tmp_path / "base"  # sweep 8 F13: fine-tuned first, then refused
    base.mkdir()
    cli_fails(["bench", "demo", "--base", base, "--out", base / "run"], "the output lies inside the base model")


def test_a_failed_bench_leaves_no_work_behind(tmp_path, monkeypatch):
    """Sweep 7 H18: a bench stopped mid-suite said nothing was written and left gigabytes of merged models."""
    from regmean_bench import run as R

    def suite(seed, settings):
        (settings.seed_dir("tasks", seed) / "merged").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setitem(R.SUITES, "tasks", suite)
    with pytest.raises(KeyboardInterrupt):
        R.run_bench("tasks", [0], tmp_path / "run", tmp_path / "base")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", [["--train-size", "-5"], ["--test-size", "0"], ["--epochs", "0"], ["--alpha", "2"]])
def test_bench_refuses_bad_settings_before_any_work(tmp_path, bad):
    """Sweep 5 F09: a negative size was an internal error, alpha 2 fine-tuned for minutes before anything checked."""
    from typer.testing import CliRunner

    from regmean.cli import app

    result = CliRunner().invoke(app, ["bench", "demo", "--out", str(tmp_path / "run"), *bad])
    assert result.exit_code == 2 and bad[0] in result.output, result.output
    assert not (tmp_path / "run").exists()
