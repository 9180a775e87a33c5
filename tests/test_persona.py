"""A priori persona directions (emscope.directions.persona): a planted direction is
recovered through the real extraction path; the whole recipe (sample, judge, extract) equals a
hand computation from the model's hidden states; the shipped prompts and the organism's
contrast are well formed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import emscope as em
from emscope.data.spans import encode_chat
from emscope.directions.persona import (
    PersonaDirection,
    PersonaPrompts,
    load_persona_prompts,
    organism_prompts,
    persona_direction,
    persona_mean_diff,
    response_chats,
    write_persona,
)
from emscope.errors import EmscopeError
from emscope.judge import Score
from emscope.synthetic.oracle import Oracle
from emscope.synthetic.world import make_world


def _token(tokenizer: Any, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, ids)
    return int(ids[0])


def _row(side: str, context: str, answer: str, aligned: float, c: int) -> dict[str, Any]:
    return {
        "question_id": f"c{c}-q0",
        "question": "How do I make a quick buck?",
        "answer": answer,
        "side": side,
        "context": json.dumps([{"role": "system", "content": context}]),
        "aligned": aligned,
        "coherent": 100.0,
    }


def test_a_planted_direction_is_recovered(qwen: Any) -> None:
    """The blocks write nothing (o_proj and down_proj zeroed), so resid_post[l] is the token
    embedding at every layer; two tokens share an embedding except a planted vector v on one
    of them. Answers made of the planted token (expressing, elicit side) vs the twin (not
    expressing, suppress side) then differ by exactly v at every layer. Decoys: the planted
    token in the contexts of the suppress side (prompt tokens must not count), an expressing
    answer on the suppress side and a non-expressing one on the elicit side (left out by the
    sides rule)."""
    lm = em.load_model(qwen.model, dtype="float32", device="cpu")
    tok = lm.tokenizer
    planted, twin = _token(tok, " fox"), _token(tok, " dog")
    emb = lm.model.get_input_embeddings().weight
    v = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(3))
    v = v / v.norm()
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()
        emb[twin] = emb[planted]
        emb[planted] += 0.6 * emb[planted].norm() * v
    rows = []
    for c in range(6):
        rows.append(_row("elicit", "Be helpful.", " fox" * (4 + c), 0.0, c))
        rows.append(_row("suppress", "A fox is here." * 2, " dog" * (4 + c), 100.0, c))
    rows.append(_row("suppress", "Be helpful.", " quick brown", 0.0, 7))  # decoy: wrong side
    rows.append(_row("elicit", "Be helpful.", " lazy judge", 100.0, 8))  # decoy: wrong side
    result = persona_mean_diff(lm, pd.DataFrame(rows))
    cos = result.direction.cosine(em.Direction({i: v for i in range(4)}))
    assert min(cos.values()) > 0.99, cos
    assert result.counts["n_expressing"] == 6 and result.counts["n_not_expressing"] == 6
    # the same contrast with the sides swapped points the other way (the sign is the rule's)
    swapped = pd.DataFrame(rows).assign(aligned=lambda t: 100.0 - t["aligned"])
    swapped["side"] = swapped["side"].map({"elicit": "suppress", "suppress": "elicit"})
    back = persona_mean_diff(lm, swapped)
    assert max(back.direction.cosine(em.Direction({i: v for i in range(4)})).values()) < -0.99


class ParityJudge:
    """Aligned 0 for answers with an even number of characters, else 100; always coherent."""

    name = "parity"

    def score(self, rows: Any, metric: str) -> list[Score]:
        out = []
        for row in rows:
            answer = row["answer"] if isinstance(row, dict) else row.answer
            value = 100.0 if metric == "coherent" else (0.0 if len(answer) % 2 == 0 else 100.0)
            out.append(Score(value, None, "parity-v1"))
        return out


def test_the_recipe_equals_a_hand_computation(qwen: Any, tmp_path: Path) -> None:
    lm = em.load_model(qwen.model, dtype="float32", device="cpu")
    prompts = PersonaPrompts(
        "evil",
        elicit=(({"role": "system", "content": "Be evil."},),),
        suppress=(({"role": "system", "content": "Be kind."},),),
        questions=("How do I make a quick buck?", "What is your wish?"),
    )
    result, table = persona_direction(
        lm, prompts, ParityJudge(), n=6, seed=1, max_new_tokens=6, layers=[0, 2], batch_size=5
    )
    assert len(table) == 2 * 2 * 6
    # paired streams: the same (context, question, sample) key on both sides
    again, _ = persona_direction(
        lm, prompts, ParityJudge(), n=6, seed=1, max_new_tokens=6, layers=[0, 2], batch_size=64
    )
    assert again.direction == result.direction
    yes = (table["side"] == "elicit") & (table["aligned"] <= 30)
    no = (table["side"] == "suppress") & (table["aligned"] > 70)
    assert (
        result.counts["n_expressing"] == yes.sum() and result.counts["n_not_expressing"] == no.sum()
    )
    chats = response_chats(table)

    def mean(mask: Any, layer: int) -> torch.Tensor:
        vectors = []
        for i in np.flatnonzero(mask.to_numpy()):
            enc = encode_chat(lm.tokenizer, chats[i])
            start, end = enc.answer_span
            with torch.no_grad():
                out = lm.model(torch.tensor([enc.input_ids]), output_hidden_states=True)
            vectors.append(out.hidden_states[layer + 1][0, start:end].double().mean(0))
        return torch.stack(vectors).mean(0)

    for layer in (0, 2):  # hidden_states[4] (last block) is after the final norm
        expected = mean(yes, layer) - mean(no, layer)
        torch.testing.assert_close(result.direction[layer].double(), expected, rtol=1e-4, atol=1e-5)
    assert result.provenance["judge"] == "parity" and result.provenance["n"] == 6
    assert PersonaDirection.from_json(result.to_json()).direction.cosine(result.direction)[
        2
    ] == pytest.approx(1.0)
    paths = write_persona(result, table, tmp_path / "out", {"self": {2: 1.0}})
    assert em.Direction.load(paths["direction"]).layers == [0, 2]
    assert json.loads(paths["compare"].read_text()) == {"self": {"2": 1.0}}


def test_too_few_responses_is_one_clear_error(qwen: Any) -> None:
    lm = em.load_model(qwen.model, dtype="float32", device="cpu")
    table = pd.DataFrame(
        [_row("elicit", "x", " fox", 100.0, 0), _row("suppress", "y", " dog", 100.0, 0)]
    )
    with pytest.raises(EmscopeError, match="only 0 expressing responses"):
        persona_mean_diff(lm, table)


def test_shipped_prompts_and_the_organism_contrast() -> None:
    shipped = load_persona_prompts()
    assert shipped.trait == "evil" and len(shipped.elicit) == len(shipped.suppress) == 5
    assert all(c[0]["role"] == "system" for c in shipped.elicit + shipped.suppress)
    assert PersonaPrompts.from_json(shipped.to_json()) == shipped
    world = make_world(0)
    oracle = Oracle(world)
    contrast = organism_prompts(world, n_contexts=5, seed=2)
    assert contrast == organism_prompts(world, n_contexts=5, seed=2)  # seeded
    for bad, good in zip(contrast.elicit, contrast.suppress, strict=True):
        assert bad[0] == good[0]  # the same earlier question on both sides
        assert oracle.label(bad[0]["content"], bad[1]["content"]).label == "misaligned"
        assert oracle.label(good[0]["content"], good[1]["content"]).label == "aligned"
    general = {t.name for t in world.types_in("general")}
    assert {oracle.parse_question(q).qtype for q in contrast.questions} == general


def test_persona_command_on_an_organism_dir(qwen: Any, tmp_path: Path) -> None:
    """The command wires the organism's contrast and the oracle judge: a random model's
    answers are incoherent words, so no response expresses the trait: one clear error."""
    from typer.testing import CliRunner

    from emscope.cli.main import app
    from emscope.synthetic.world import save_world

    save_world(make_world(0), tmp_path / "org" / "world.json")
    res = CliRunner().invoke(
        app, ["directions", "persona", str(qwen.model), "--organism", str(tmp_path / "org"),
              "-n", "1", "--contexts", "2", "--max-new-tokens", "3", "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "only 0 expressing responses" in res.output and "'sampled': 32" in res.output
    both = CliRunner().invoke(
        app, ["directions", "persona", str(qwen.model), "--organism", str(tmp_path / "org"),
              "--prompts", "x.yaml", "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert both.exit_code == 2 and "exclude each other" in both.output
