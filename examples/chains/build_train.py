"""Build examples/chains/chains_train.jsonl: chat records that teach the embedded model the shipped chains' tasks.

    .venv/bin/python examples/chains/build_train.py      # deterministic (seed 0); then configs/chains_tuned.yaml

The records use the chains' own prompts (`classify_prompt`, `extract_prompt` and the RAG question prompt, filled
from configs/chains/*.yaml), so the tuned run learns exactly what it is asked at inference. Texts, names and cities
come from templates and word lists here; none of the *_eval.jsonl cases is among them (checked at the end), and
none of the eval's names or cities is used, so the eval measures what the run learned, not what it saw.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunesmith.chains.chat_model import to_chat
from tunesmith.chains.config import extraction_schema, load_chain_config
from tunesmith.chains.extract import extract_prompt
from tunesmith.chains.pipelines import classify_prompt
from tunesmith.chains.prompts import RAG_QUESTION

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# -- classify: issue reports --------------------------------------------------------------------------------------
PARTS = ["the web app", "the training loop", "the merge command", "the eval command", "the chat command",
         "the API server", "the data loader", "the config parser", "checkpoint saving", "the tokenizer",
         "the summarize chain", "the documents tab", "the login page", "the export step", "the CLI",
         "the installer", "the GPU backend", "the scheduler", "the sweep command", "the index builder"]
BUG = ["{P} crashes with a KeyError.", "After the upgrade, {p} hangs forever.", "{P} throws an exception on empty input.",
       "I get a traceback from {p} on Windows.", "{P} gives wrong numbers.", "{P} segfaults with bf16.",
       "{P} is broken since version 0.3.", "{P} fails with 'permission denied'.", "{P} writes a corrupted file.",
       "{P} stops responding after a few minutes.", "{P} leaks memory until the machine swaps.",
       "Error in {p}: index out of range.", "{P} silently drops half of my records.", "{P} shows the wrong date.",
       "{P} randomly exits with code 139.", "{P} ignores the seed, so results differ every time.",
       "Clicking cancel in {p} does nothing and the job keeps running.", "{P} returns an empty answer.",
       "{P} raises a ValueError when the path has spaces.", "{P} doubles every line it prints."]
FEATURE = ["Please add a way to pause {p}.", "It would be nice if {p} supported YAML anchors.",
           "Could {p} get a --quiet flag?", "Feature request: let {p} read from stdin.",
           "I'd like {p} to send a notification when it finishes.", "Add an option to colour the output of {p}.",
           "Support for Parquet files in {p} would help a lot.", "Can you make {p} configurable per user?",
           "Would love a progress bar in {p}.", "Please make {p} support several languages.",
           "Idea: {p} could cache its results between runs.", "Add a plugin hook to {p}.",
           "Suggestion: show a summary table at the end of {p}.", "Allow {p} to export results as CSV.",
           "Please add keyboard shortcuts to {p}.", "It would help if {p} could run on a schedule.",
           "New option request: a timeout setting for {p}.", "Make {p} remember my last settings, please.",
           "I wish {p} had a dark theme.", "Could you add retries with backoff to {p}?"]
QUESTION = ["How do I configure {p}?", "Is there a way to run {p} offline?", "What does the --verbose flag of {p} do?",
            "Which settings does {p} read?", "Can {p} use more than one CPU core?",
            "Where does {p} write its log file?", "What is the recommended way to update {p}?",
            "Does {p} work on macOS?", "How can I make {p} faster?", "Why does {p} need so much disk space?",
            "What is the default timeout of {p}?", "Is {p} thread-safe?", "How do I turn off {p}?",
            "Which Python versions does {p} support?", "Where is the documentation for {p}?",
            "What happens if I interrupt {p}?", "Can I call {p} from a script?",
            "How much memory does {p} need?", "Should I run {p} before or after training?",
            "What is the difference between {p} and the old version?"]

# -- extract: people ------------------------------------------------------------------------------------------------
FIRST = ["Alice", "Bruno", "Chloe", "Daniel", "Eva", "Felix", "Gina", "Hugo", "Ines", "Jonas", "Kira", "Luca",
         "Mira", "Noah", "Omar", "Paula", "Rafael", "Sofia", "Tomas", "Ursula", "Victor", "Wanda", "Yasmin", "Zoltan",
         "Amir", "Bea", "Cyril", "Dana", "Emil", "Freya", "Goran", "Hana", "Ivo", "Julia", "Kofi", "Lena", "Mateo",
         "Nadia", "Oscar", "Priya"]
LAST = ["Meyer", "Costa", "Jensen", "Moreau", "Schmidt", "Kowalski", "Nakamura", "Okafor", "Larsen", "Petrov", "Santos",
        "Weber", "Nguyen", "Kim", "Fischer", "Andersen", "Martin", "Horvat", "Yilmaz", "Mensah", "Keller", "Popov",
        "Lindqvist", "Romero", "Kaur", "Suzuki", "Eriksen", "Bauer", "Russo", "Mendes"]
CITIES = ["Berlin", "Vienna", "Zurich", "Amsterdam", "Brussels", "Helsinki", "Athens", "Budapest", "Krakow", "Porto",
          "Seville", "Naples", "Munich", "Hamburg", "Marseille", "Geneva", "Nairobi", "Lagos", "Accra", "Mumbai",
          "Seoul", "Tokyo", "Sydney", "Auckland", "Chicago", "Boston", "Denver", "Lima", "Bogota", "Santiago",
          "New York", "Cape Town", "Hong Kong", "Kuala Lumpur", "Rio de Janeiro"]
BOTH = ["My name is {n}, I am {a} and I live in {c}.", "{n}, {a}, from {c}.", "Hi, I'm {n}. I'm {a} years old and live in {c}.",
        "{n} ({a}) lives in {c}.", "This is {n} from {c}, {a} years old.", "{n} is {a} and works in {c}.",
        "I am {n}, a {a}-year-old nurse living in {c}.", "Name: {n}. Age: {a}. City: {c}.",
        "{n} moved to {c} at the age of {a}.", "Hello! {n} here, {a}, based in {c}.",
        "{n} lives in {c}. She is {a}.", "{n} lives in {c}. He is {a} years old.",
        "Meet {n}, {a}, a designer from {c}."]
NO_AGE = ["My name is {n} and I live in {c}.", "{n} from {c}.", "Hi, I'm {n}, based in {c}.",
          "{n} has lived in {c} for years.", "This is {n}. I was born in {c}.", "{n}, a teacher in {c}.",
          "{n} lives in {c} with two cats.", "I'm {n} and I work at a bakery in {c}.", "{n} moved to {c} in 2019.",
          "Greetings from {c}! I am {n}."]
NO_CITY = ["My name is {n} and I am {a}.", "{n}, {a}.", "I'm {n}, {a} years old.", "{n} turned {a} yesterday.",
           "This is {n}, aged {a}.", "{n} is a {a}-year-old pilot."]

# -- rag: the question each sentence answers, about other tools than tunesmith --------------------------------------
RAG_PAIRS = [
    ("Run `git stash` to put away uncommitted changes.", "How do I set aside my uncommitted changes?"),
    ("Use `git log --oneline` to see one line per commit.", "How can I list the commits compactly?"),
    ("`git rebase -i HEAD~3` lets you edit the last three commits.", "How do I rewrite my last few commits?"),
    ("A new branch is created with `git switch -c NAME`.", "How do I create a branch?"),
    ("`docker ps` lists the running containers.", "Which command shows running containers?"),
    ("Stop a container with `docker stop ID`.", "How do I stop a container?"),
    ("Images are built from a Dockerfile with `docker build -t NAME .`.", "How do I build an image?"),
    ("The `-p 8080:80` option publishes a container port on the host.", "How do I expose a port of a container?"),
    ("Install a package with `pip install NAME`.", "How do I install a Python package?"),
    ("`pip freeze` prints the installed packages with their versions.", "How can I list installed package versions?"),
    ("Create a virtual environment with `python -m venv .venv`.", "How do I make a virtual environment?"),
    ("The `--upgrade` flag makes pip install the newest version.", "How do I update a package to the latest version?"),
    ("`ls -la` shows hidden files as well.", "How do I see hidden files?"),
    ("Use `df -h` to see free disk space.", "How can I check how much disk space is left?"),
    ("`chmod +x FILE` makes a file executable.", "How do I make a script executable?"),
    ("The `tail -f` command follows a log file as it grows.", "How do I watch a log file live?"),
    ("Press Ctrl-R in bash to search your command history.", "How do I search previous commands?"),
    ("Environment variables are set for one command with `NAME=value command`.", "How do I set a variable for a single command?"),
    ("Cron runs scheduled jobs listed in the crontab.", "What runs scheduled jobs?"),
    ("Edit your scheduled jobs with `crontab -e`.", "How do I change my cron jobs?"),
    ("The server listens on port 5432 by default.", "Which port does the database use by default?"),
    ("Backups are written every night at 2 am.", "When are backups made?"),
    ("Set `max_connections` to allow more clients at once.", "Which setting controls how many clients can connect?"),
    ("Logs are kept for 30 days and then deleted.", "How long are logs kept?"),
    ("The free plan allows 3 projects.", "How many projects can I have on the free plan?"),
    ("Passwords must be at least 12 characters long.", "How long does a password need to be?"),
    ("Invoices are sent by email on the first day of each month.", "When do I get my invoice?"),
    ("You can cancel your subscription at any time from the account page.", "How do I cancel my subscription?"),
    ("Support answers within one business day.", "How fast does support reply?"),
    ("The app is available in English, German and Spanish.", "Which languages does the app support?"),
    ("Two-factor authentication is turned on under Security settings.", "Where do I enable two-factor authentication?"),
    ("Exports are limited to 10,000 rows.", "How many rows can I export?"),
    ("The API allows 100 requests per minute.", "What is the rate limit of the API?"),
    ("API keys are created on the Developer page.", "Where do I get an API key?"),
    ("Webhooks retry failed deliveries five times.", "How often are failed webhooks retried?"),
    ("The mobile app needs Android 10 or newer.", "Which Android version do I need?"),
    ("Reset your password with the link on the login page.", "How do I reset my password?"),
    ("Files larger than 2 GB cannot be uploaded.", "What is the maximum upload size?"),
    ("Deleted files stay in the trash for 14 days.", "Can I get a deleted file back?"),
    ("The office is closed on public holidays.", "Is the office open on holidays?"),
    ("Tickets can be refunded up to 24 hours before the show.", "Until when can I get a refund?"),
    ("Trains to the airport leave every 15 minutes.", "How often do airport trains run?"),
    ("The museum is free on the first Sunday of the month.", "When is the museum free?"),
    ("Parking costs 3 euros per hour.", "How much does parking cost?"),
    ("Breakfast is served from 7 to 10 am.", "When is breakfast?"),
    ("Check-out time is 11 am.", "When do I have to check out?"),
    ("Pets are allowed in ground-floor rooms only.", "Can I bring my dog?"),
    ("The library lends up to 8 books at a time.", "How many books can I borrow?"),
    ("Late returns cost 50 cents per day.", "What is the fee for returning a book late?"),
    ("Water the plant once a week in summer.", "How often should I water the plant?"),
    ("The battery lasts about ten hours.", "How long does the battery last?"),
    ("Charge the device with the USB-C cable in the box.", "How do I charge it?"),
    ("Hold the power button for ten seconds to reset the device.", "How do I reset the device?"),
    ("The warranty covers two years from purchase.", "How long is the warranty?"),
    ("The printer connects over Wi-Fi or USB.", "How does the printer connect?"),
    ("Firmware updates install automatically at night.", "How are firmware updates installed?"),
    ("Use `npm run build` to make a production bundle.", "How do I build for production?"),
    ("Tests are run with `npm test`.", "How do I run the tests?"),
    ("The `.env` file holds local secrets and is not committed.", "Where do local secrets go?"),
    ("Set `NODE_ENV=production` to turn off debug output.", "How do I disable debug output?"),
    ("`make clean` removes all build artifacts.", "How do I delete the build output?"),
    ("The compiler is chosen with the `CC` variable.", "How do I pick the compiler?"),
    ("`pytest -k NAME` runs only the tests whose names match.", "How do I run a subset of the tests?"),
    ("Coverage is measured with `coverage run -m pytest`.", "How do I measure test coverage?"),
    ("Type hints are checked with `mypy`.", "Which tool checks type hints?"),
    ("`ruff format` formats the code.", "How do I format the code?"),
    ("Set the log level with `--log-level debug`.", "How do I get more detailed logs?"),
    ("The cache lives in `~/.cache/app`.", "Where is the cache stored?"),
    ("Delete the cache folder to free space.", "How do I clear the cache?"),
    ("The config file is read from `/etc/app.conf`.", "Where is the config file?"),
]
DISTRACTORS = [s for s, _ in RAG_PAIRS]


def records(seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    out: list[dict] = []

    cls_cfg = load_chain_config(ROOT / "configs" / "chains" / "classify.yaml")
    cls_prompt = classify_prompt(cls_cfg.labels, instructions=cls_cfg.instructions,
                                 examples=[(e["text"], e["label"]) for e in cls_cfg.examples])
    for label, templates in (("bug", BUG), ("feature", FEATURE), ("question", QUESTION)):
        for t in templates:
            for part in rnd.sample(PARTS, 2):
                text = t.replace("{p}", part).replace("{P}", part[0].upper() + part[1:])
                msgs = to_chat(cls_prompt.invoke({"text": text}).to_messages())
                out.append({"messages": [*msgs, {"role": "assistant", "content": label}], "task": "classify"})

    ext_cfg = load_chain_config(ROOT / "configs" / "chains" / "extract.yaml")
    ext_prompt = extract_prompt(extraction_schema(ext_cfg, "extract"), instructions=ext_cfg.instructions)
    for templates, has_age, has_city, n in ((BOTH, True, True, 80), (NO_AGE, False, True, 60), (NO_CITY, True, False, 50)):
        for _ in range(n):
            name = rnd.choice(FIRST) + ("" if rnd.random() < 0.15 else " " + rnd.choice(LAST))
            age, city = rnd.randint(16, 90), rnd.choice(CITIES)
            text = rnd.choice(templates).format(n=name, a=age, c=city)
            answer = {"name": name, "age": age if has_age else None, "city": city if has_city else None}
            msgs = to_chat(ext_prompt.invoke({"text": text}).to_messages())
            out.append({"messages": [*msgs, {"role": "assistant", "content": json.dumps(answer)}], "task": "extract"})

    for sentence, question in RAG_PAIRS:  # the query-likelihood skill extractive RAG ranks sentences with
        out.append({"messages": [{"role": "user", "content": RAG_QUESTION.format(sentence=sentence)},
                                 {"role": "assistant", "content": question}], "task": "rag"})
    rnd.shuffle(out)
    return out


def main() -> None:
    recs = records()
    evals = {json.loads(line)["input"] for f in HERE.glob("*_eval.jsonl") for line in f.read_text().splitlines()}
    leaked = [r for r in recs if any(m["content"] in evals for m in r["messages"])]
    assert not leaked, f"eval cases in the training data: {leaked[:3]}"
    people = [json.loads(line)["expected"] for line in (HERE / "extract_eval.jsonl").read_text().splitlines()]
    eval_words = {w for p in people for v in (p["name"], p["city"]) if v for w in v.split()}
    shared = eval_words & {*FIRST, *LAST, *CITIES}
    assert not shared, f"names or cities of the extract eval in the training lists: {sorted(shared)}"
    path = HERE / "chains_train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    counts = {t: sum(r["task"] == t for r in recs) for t in ("classify", "extract", "rag")}
    print(f"wrote {len(recs)} records to {path.relative_to(ROOT)}: {counts}")


if __name__ == "__main__":
    main()
