"""The embedded demo task: a small synthetic world of people and places, built deterministically from a seed.

Facts, one per passage: ``p17 lives in c3``, ``p17 works at o5``, ``p17 was born in c8``, ``p17 reports to p42``.
Questions:

- one hop:  ``which city is home to p17 ?``              gold: ``p17 lives in c3``
- two hops: ``which city is home to the boss of p17 ?``  gold: ``p17 reports to p42`` and ``p42 lives in c9``

Each question's N candidates hold its gold passages, the other facts about the people it involves (they share the
question's names, so a retriever ranks them high), and facts about random other people. The two-hop answer passage
(``p42 lives in c9``) shares no word with the question, while ``p17 lives in c3`` (the asked person's own home,
``own_home_distractor``) matches it well: a real first-stage retriever ranks the wrong home first, the way dense
retrievers fail on multi-hop questions. Answers cannot be guessed: cities are drawn at random for every person.

Models are tiny Llama-architecture causal LMs built from a config, with a word-level tokenizer trained offline on the
demo text, so everything runs without the Hub.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


@dataclass
class WorldConfig:
    """Size and shape of the synthetic world."""

    num_people: int = 200
    num_cities: int = 40
    num_orgs: int = 30
    num_candidates: int = 8
    two_hop_fraction: float = 0.5
    own_home_distractor: bool = True
    seed: int = 0


def _facts(person: str, world: dict) -> dict[str, str]:
    return {
        "lives": f"{person} lives in {world['lives'][person]}",
        "works": f"{person} works at {world['works'][person]}",
        "born": f"{person} was born in {world['born'][person]}",
        "reports": f"{person} reports to {world['boss'][person]}",
    }


def build_world(cfg: WorldConfig) -> dict:
    """People with a home city, an employer, a birth city and a boss, drawn from ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    people = [f"p{i}" for i in range(cfg.num_people)]
    cities = [f"c{i}" for i in range(cfg.num_cities)]
    orgs = [f"o{i}" for i in range(cfg.num_orgs)]
    return {
        "people": people,
        "lives": {p: rng.choice(cities) for p in people},
        "works": {p: rng.choice(orgs) for p in people},
        "born": {p: rng.choice(cities) for p in people},
        "boss": {p: rng.choice([q for q in people if q != p]) for p in people},
    }


def make_example(world: dict, cfg: WorldConfig, rng: random.Random, index: int) -> dict:
    """One question with N candidate passages (unranked; retrieval orders them later)."""
    person = rng.choice(world["people"])
    two_hop = rng.random() < cfg.two_hop_fraction
    mine = _facts(person, world)
    if two_hop:
        boss = world["boss"][person]
        theirs = _facts(boss, world)
        question = f"which city is home to the boss of {person} ?"
        answer = world["lives"][boss]
        gold = [mine["reports"], theirs["lives"]]
        related = [mine["works"], mine["born"], theirs["works"], theirs["born"]]
        if cfg.own_home_distractor:
            related.append(mine["lives"])
    else:
        question = f"which city is home to {person} ?"
        answer = world["lives"][person]
        gold = [mine["lives"]]
        related = [mine["works"], mine["born"], mine["reports"]]
    rng.shuffle(related)
    passages = gold + related[: max(0, cfg.num_candidates - len(gold))]
    others = [p for p in world["people"] if p not in question.split() and p != world["boss"][person]]
    while len(passages) < cfg.num_candidates:
        other = _facts(rng.choice(others), world)
        fact = other[rng.choice(["works", "born", "reports"])]
        if fact not in passages:
            passages.append(fact)
    labels = [True] * len(gold) + [False] * (len(passages) - len(gold))
    order = list(range(len(passages)))
    rng.shuffle(order)
    return {
        "id": f"demo-{cfg.seed}-{index}",
        "question": question,
        "answers": [answer],
        "passages": [{"title": "", "text": passages[i]} for i in order],
        "gold": [labels[i] for i in order],
        "metadata": {"hops": 2 if two_hop else 1},  # what evaluate.py --group_by hops splits the scores by
    }


def make_split(cfg: WorldConfig, size: int, split_seed: int) -> list[dict]:
    """``size`` questions about the world of ``cfg.seed``, drawn with ``split_seed``."""
    world = build_world(cfg)
    rng = random.Random(split_seed * 7919 + cfg.seed)
    return [make_example(world, cfg, rng, split_seed * 1_000_000 + i) for i in range(size)]


def build_tokenizer(texts: list[str], num_ids: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the demo text: every entity, id ``[i]`` and word is one token."""
    words = [PAD, EOS, UNK] + [f"[{i + 1}]" for i in range(num_ids)] + [">"]
    words += sorted({w for t in texts for w in t.split()} - set(words))
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def tiny_llama(vocab_size: int, hidden: int, layers: int, heads: int, seed: int, pad_id: int, eos_id: int):
    """A randomly initialised Llama-architecture causal LM of the given shape."""
    import torch

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    return model


def demo_tokenizer(rows: list[dict], num_candidates: int, k: int) -> PreTrainedTokenizerFast:
    """The word-level tokenizer for these rows and the selector/generator prompt templates."""
    from .selector import INSTRUCTION, OUTPUT_FORMAT, SEPARATOR, format_id

    texts = []
    for n in range(1, num_candidates + 1):  # rows may hold fewer candidates, and K is capped at N
        for kk in range(1, min(k, n) + 1):
            texts.append(INSTRUCTION.format(n=n, k=kk))
            texts.append(OUTPUT_FORMAT.format(k=kk, example=SEPARATOR.join(format_id(i) for i in range(kk))))
    texts.append("Question: Answer: Passage " + " ".join(f"{i + 1}:" for i in range(num_candidates)))
    for row in rows:
        texts.append(row["question"] + " " + " ".join(row["answers"]))
        texts.extend(p["text"] for p in row["passages"])
    return build_tokenizer(texts, num_candidates)
