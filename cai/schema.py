"""The store's schema as numbered migrations. Never edit a released migration: add a new one.

Conventions: ``*_id`` keys are content hashes (see ``store.content_hash``), ``params`` columns
hold the JSON of whatever shaped the row (sampling parameters, hyper-parameters), ``run_id``
points at the ``runs`` row of the stage invocation that wrote it.
"""

from __future__ import annotations

_V1_TABLES = [
    """
    CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY,
        stage VARCHAR NOT NULL,
        status VARCHAR NOT NULL,            -- running | ok | failed | interrupted | stopped | stale
        started_at TIMESTAMP,
        finished_at TIMESTAMP,
        params JSON,
        summary JSON,
        error VARCHAR,
        cai_version VARCHAR,
        host VARCHAR
    )""",
    """
    CREATE TABLE constitutions (
        constitution_hash VARCHAR PRIMARY KEY,
        name VARCHAR NOT NULL,
        version VARCHAR,
        path VARCHAR,
        yaml_text VARCHAR,
        created_at TIMESTAMP
    )""",
    """
    CREATE TABLE principles (
        constitution_hash VARCHAR NOT NULL,
        principle_id VARCHAR NOT NULL,
        critique VARCHAR,
        revision VARCHAR,
        judge VARCHAR,
        weight DOUBLE,
        tags VARCHAR[],
        PRIMARY KEY (constitution_hash, principle_id)
    )""",
    """
    CREATE TABLE prompts (
        prompt_id VARCHAR PRIMARY KEY,      -- hash of the messages
        messages JSON NOT NULL,             -- [{"role": ..., "content": ...}, ...]
        prompt_text VARCHAR,                -- the last user message, for reading
        external_id VARCHAR,                -- the "id" field of the source file, if any
        category VARCHAR,
        tags VARCHAR[],
        split VARCHAR,                      -- train | test (held out for evaluation)
        source VARCHAR,
        source_line INTEGER,
        meta JSON,
        run_id VARCHAR,
        created_at TIMESTAMP
    )""",
    """
    CREATE TABLE models (
        model_id VARCHAR PRIMARY KEY,
        kind VARCHAR NOT NULL,              -- base | policy | reward | value
        path VARCHAR,
        base_model_id VARCHAR,
        parent_ids VARCHAR[],
        params JSON,
        data_snapshot JSON,
        run_id VARCHAR,
        created_at TIMESTAMP
    )""",
    """
    CREATE TABLE generations (
        generation_id VARCHAR PRIMARY KEY,  -- hash(prompt, model, params, sample_index)
        prompt_id VARCHAR NOT NULL,
        stage VARCHAR NOT NULL,             -- initial | eval | rollout
        model_id VARCHAR NOT NULL,
        engine VARCHAR,
        sample_index INTEGER,
        seed BIGINT,
        params JSON,
        params_hash VARCHAR,
        text VARCHAR,
        token_ids INTEGER[],
        logprobs FLOAT[],
        num_tokens INTEGER,
        finish_reason VARCHAR,
        run_id VARCHAR,
        created_at TIMESTAMP
    )""",
    """
    CREATE TABLE revisions (
        revision_id VARCHAR PRIMARY KEY,
        generation_id VARCHAR NOT NULL,
        round INTEGER NOT NULL,             -- 1, 2, ...
        principle_id VARCHAR,
        constitution_hash VARCHAR,
        critique_request VARCHAR,
        critique VARCHAR,
        revision_request VARCHAR,
        revision VARCHAR,                   -- cleaned text
        raw_revision VARCHAR,               -- what the model wrote
        raw_critique VARCHAR,               -- what the model wrote (critique is the cleaned text)
        cleaning VARCHAR[],                 -- names of the cleaning rules that changed the revision
        status VARCHAR,                     -- ok | empty | unchanged | too_long | copied_critique
        reason VARCHAR,
        parent_revision_id VARCHAR,         -- the round whose revision this one revises (NULL: the generation)
        critique_tokens INTEGER,
        revision_tokens INTEGER,
        finish_reason VARCHAR,              -- of the revision: stop | length
        model_id VARCHAR,
        engine VARCHAR,
        seed BIGINT,                        -- the revision's sampling seed (params has both seeds)
        params JSON,
        params_hash VARCHAR,
        run_id VARCHAR,
        created_at TIMESTAMP
    )""",
    """
    CREATE TABLE comparisons (
        comparison_id VARCHAR PRIMARY KEY,
        prompt_id VARCHAR NOT NULL,
        pair_kind VARCHAR,                  -- initial_vs_revised | two_samples | ...
        response_a_id VARCHAR,
        response_b_id VARCHAR,
        response_a VARCHAR,
        response_b VARCHAR,
        principle_ids VARCHAR[],
        constitution_hash VARCHAR,
        judge_name VARCHAR,
        judge_spec_hash VARCHAR,
        judge_model_id VARCHAR,
        judge_engine VARCHAR,               -- transformers | vllm | openai (not part of the id)
        method VARCHAR,                     -- multiple_choice | cot | score
        p_a_first DOUBLE,                   -- P(A better) with A shown first (mean over principles)
        p_a_swapped DOUBLE,                 -- P(A better) with A shown second (NULL: one ordering)
        p_a DOUBLE,                         -- final soft label: P(response_a is better), cot clamped
        position_consistent BOOLEAN,        -- both orderings prefer the same response
        score_a DOUBLE,                     -- score method: direct reward of response_a in [-1, 1]
        score_b DOUBLE,
        raw_output JSON,                    -- per principle: option probabilities, labels, cot reasoning
        status VARCHAR,                     -- ok | invalid
        reason VARCHAR,                     -- invalid: both_tokens_improbable | rating_tokens_improbable | refusal | unparsable
        seed BIGINT,
        params JSON,
        run_id VARCHAR,
        created_at TIMESTAMP
    )""",
    """
    CREATE TABLE metrics (
        run_id VARCHAR NOT NULL,
        model_id VARCHAR,
        step INTEGER NOT NULL,
        split VARCHAR NOT NULL DEFAULT 'train',
        name VARCHAR NOT NULL,
        value DOUBLE,
        created_at TIMESTAMP,
        PRIMARY KEY (run_id, step, split, name)
    )""",
    # Sample responses a training run (PPO) wrote every few steps, to read how the policy drifts.
    """
    CREATE TABLE samples (
        sample_id VARCHAR PRIMARY KEY,      -- hash(run_id, step, split, index)
        run_id VARCHAR NOT NULL,
        model_id VARCHAR,
        step INTEGER NOT NULL,
        split VARCHAR,                      -- train (rollouts) | test (held-out prompts)
        prompt_id VARCHAR,
        prompt VARCHAR,
        response VARCHAR,
        reward DOUBLE,                      -- the reward's score, before KL penalty and shaping
        kl DOUBLE,                          -- sum over tokens of log pi - log pi_ref
        num_tokens INTEGER,
        finish_reason VARCHAR,              -- stop | length
        created_at TIMESTAMP
    )""",
    """
    CREATE TABLE evaluations (
        evaluation_id VARCHAR PRIMARY KEY,
        kind VARCHAR NOT NULL,              -- judge_quality | reward_model | policy
        subject_id VARCHAR,                 -- judge spec hash or model id being evaluated
        baseline_id VARCHAR,
        dataset VARCHAR,
        metric VARCHAR NOT NULL,
        value DOUBLE,
        details JSON,
        run_id VARCHAR,
        created_at TIMESTAMP
    )""",
]

_V1_VIEWS = [
    # Final revision of every initial generation: the SL-CAI training pairs. "Final" is the last round
    # whose revision is ok, per (generation, constitution, reviser model, critique settings).
    """
    CREATE OR REPLACE VIEW sl_cai AS
    SELECT p.prompt_id, p.prompt_text AS prompt, p.messages, p.split, p.category,
           g.generation_id, g.text AS initial_response,
           r.revision_id, r.revision AS revision, r.round AS rounds, r.principle_id AS last_principle_id,
           r.constitution_hash, r.model_id, r.params_hash
    FROM revisions r
    JOIN generations g USING (generation_id)
    JOIN prompts p USING (prompt_id)
    WHERE r.status = 'ok'
    QUALIFY row_number() OVER (PARTITION BY r.generation_id, r.constitution_hash, r.model_id, r.params_hash
                               ORDER BY r.round DESC) = 1
    """,
    # How the critique rounds went, per constitution and principle: `cai critique --report`.
    """
    CREATE OR REPLACE VIEW critique_report AS
    SELECT constitution_hash, principle_id, count(*) AS rounds,
           count(*) FILTER (WHERE status = 'ok') AS ok,
           count(*) FILTER (WHERE status = 'empty') AS empty,
           count(*) FILTER (WHERE status = 'unchanged') AS unchanged,
           count(*) FILTER (WHERE status = 'too_long') AS too_long,
           count(*) FILTER (WHERE status NOT IN ('ok', 'empty', 'unchanged', 'too_long')) AS other,
           round(count(*) FILTER (WHERE status = 'ok') / count(*), 3) AS ok_rate,
           count(*) FILTER (WHERE len(cleaning) > 0) AS cleaned,
           round(avg(length(revision)) FILTER (WHERE status = 'ok'), 1) AS mean_ok_chars
    FROM revisions
    GROUP BY constitution_hash, principle_id
    ORDER BY constitution_hash, principle_id
    """,
    # Comparisons as (chosen, rejected). The tie rule: chosen is response_a when p_a > 0.5 and
    # response_b when p_a < 0.5; p_a = 0.5 exactly carries no preference and is left out (as are
    # invalid comparisons). probability = P(chosen is better) = max(p_a, 1 - p_a), in (0.5, 1].
    """
    CREATE OR REPLACE VIEW preferences AS
    SELECT c.comparison_id, c.prompt_id, p.prompt_text AS prompt, p.messages,
           CASE WHEN c.p_a > 0.5 THEN c.response_a ELSE c.response_b END AS chosen,
           CASE WHEN c.p_a > 0.5 THEN c.response_b ELSE c.response_a END AS rejected,
           CASE WHEN c.p_a > 0.5 THEN c.response_a_id ELSE c.response_b_id END AS chosen_id,
           CASE WHEN c.p_a > 0.5 THEN c.response_b_id ELSE c.response_a_id END AS rejected_id,
           greatest(c.p_a, 1 - c.p_a) AS probability,
           CASE WHEN c.p_a > 0.5 THEN c.score_a ELSE c.score_b END AS score_chosen,
           CASE WHEN c.p_a > 0.5 THEN c.score_b ELSE c.score_a END AS score_rejected,
           c.principle_ids, c.judge_name, c.judge_spec_hash, c.judge_model_id, c.constitution_hash,
           c.method, c.pair_kind, c.position_consistent, c.run_id, c.created_at
    FROM comparisons c JOIN prompts p USING (prompt_id)
    WHERE c.status = 'ok' AND c.p_a IS NOT NULL AND c.p_a <> 0.5
    """,
    """
    CREATE OR REPLACE VIEW judge_quality AS
    SELECT subject_id AS judge_spec_hash, json_extract_string(details, '$.judge') AS judge,
           json_extract_string(details, '$.model_id') AS judge_model_id,
           json_extract_string(details, '$.engine') AS engine, dataset,
           TRY_CAST(json_extract_string(details, '$.n') AS INTEGER) AS n, metric, value, details, run_id, created_at
    FROM evaluations WHERE kind = 'judge_quality'
    """,
    """
    CREATE OR REPLACE VIEW training_curves AS
    SELECT m.run_id, r.stage, m.model_id, m.step, m.split, m.name AS metric, m.value, m.created_at
    FROM metrics m LEFT JOIN runs r USING (run_id)
    """,
    # Everything an initial generation became, for reading side by side.
    """
    CREATE OR REPLACE VIEW generations_readable AS
    SELECT g.generation_id, p.category, p.prompt_text AS prompt, g.text AS response, g.model_id, g.engine,
           g.sample_index, g.num_tokens, g.finish_reason, g.run_id
    FROM generations g JOIN prompts p USING (prompt_id)
    """,
]

# Version 2: views over the evaluate stage's rows (`cai evaluate`, cai/evaluate.py).
_V2_VIEWS = [
    # One row per policy metric: the policy's value and, where the metric has one, the baseline's.
    """
    CREATE OR REPLACE VIEW policy_evaluations AS
    SELECT e.subject_id AS policy_id, e.baseline_id, e.dataset, e.metric, e.value,
           TRY_CAST(json_extract_string(e.details, '$.baseline_value') AS DOUBLE) AS baseline_value,
           TRY_CAST(json_extract_string(e.details, '$.n') AS INTEGER) AS n,
           TRY_CAST(json_extract_string(e.details, '$.stderr') AS DOUBLE) AS stderr,
           json_extract_string(e.details, '$.judge') AS judge,
           json_extract_string(e.details, '$.judge_spec_hash') AS judge_spec_hash,
           json_extract_string(e.details, '$.constitution_hash') AS constitution_hash,
           json_extract_string(e.details, '$.reward_model_id') AS reward_model_id,
           e.details, e.run_id, e.created_at
    FROM evaluations e
    WHERE e.kind = 'policy' AND e.metric <> 'elo'
    """,
    # The latest Elo of every evaluated model, per judge spec and constitution.
    """
    CREATE OR REPLACE VIEW policy_elo AS
    SELECT e.subject_id AS model_id, e.value AS elo,
           TRY_CAST(json_extract_string(e.details, '$.games') AS INTEGER) AS games,
           TRY_CAST(json_extract_string(e.details, '$.score') AS DOUBLE) AS score,
           json_extract_string(e.details, '$.judge') AS judge,
           json_extract_string(e.details, '$.judge_spec_hash') AS judge_spec_hash,
           json_extract_string(e.details, '$.constitution_hash') AS constitution_hash,
           e.run_id, e.created_at
    FROM evaluations e
    WHERE e.kind = 'policy' AND e.metric = 'elo'
    QUALIFY row_number() OVER (
        PARTITION BY e.subject_id, json_extract_string(e.details, '$.judge_spec_hash'),
                     json_extract_string(e.details, '$.constitution_hash')
        ORDER BY e.created_at DESC) = 1
    """,
]

# Version 3 (issue 12): people's preference labels live in `comparisons` too (cai/preferences.py:
# method = pair_kind = 'human', judge_name = 'human:<source>', response_a = the chosen response).
_V3_VIEWS = [
    # `preferences` is the AI judge's labels (export, DPO): v1's definition, human rows left out.
    """
    CREATE OR REPLACE VIEW preferences AS
    SELECT c.comparison_id, c.prompt_id, p.prompt_text AS prompt, p.messages,
           CASE WHEN c.p_a > 0.5 THEN c.response_a ELSE c.response_b END AS chosen,
           CASE WHEN c.p_a > 0.5 THEN c.response_b ELSE c.response_a END AS rejected,
           CASE WHEN c.p_a > 0.5 THEN c.response_a_id ELSE c.response_b_id END AS chosen_id,
           CASE WHEN c.p_a > 0.5 THEN c.response_b_id ELSE c.response_a_id END AS rejected_id,
           greatest(c.p_a, 1 - c.p_a) AS probability,
           CASE WHEN c.p_a > 0.5 THEN c.score_a ELSE c.score_b END AS score_chosen,
           CASE WHEN c.p_a > 0.5 THEN c.score_b ELSE c.score_a END AS score_rejected,
           c.principle_ids, c.judge_name, c.judge_spec_hash, c.judge_model_id, c.constitution_hash,
           c.method, c.pair_kind, c.position_consistent, c.run_id, c.created_at
    FROM comparisons c JOIN prompts p USING (prompt_id)
    WHERE c.status = 'ok' AND c.p_a IS NOT NULL AND c.p_a <> 0.5 AND c.method IS DISTINCT FROM 'human'
    """,
    # People's labels, one row per pair: same tie rule as `preferences`; probability = the vote share.
    """
    CREATE OR REPLACE VIEW human_preferences AS
    SELECT c.comparison_id, c.prompt_id, p.prompt_text AS prompt, p.messages, p.split,
           CASE WHEN c.p_a > 0.5 THEN c.response_a ELSE c.response_b END AS chosen,
           CASE WHEN c.p_a > 0.5 THEN c.response_b ELSE c.response_a END AS rejected,
           CASE WHEN c.p_a > 0.5 THEN c.response_a_id ELSE c.response_b_id END AS chosen_id,
           CASE WHEN c.p_a > 0.5 THEN c.response_b_id ELSE c.response_a_id END AS rejected_id,
           greatest(c.p_a, 1 - c.p_a) AS probability,
           c.judge_name, substr(c.judge_name, 7) AS source,
           json_extract_string(c.params, '$.file') AS file,
           TRY_CAST(json_extract_string(c.params, '$.line') AS INTEGER) AS line,
           json_extract_string(c.params, '$.id') AS external_id,
           json_extract_string(c.params, '$.subset') AS subset,
           c.run_id, c.created_at
    FROM comparisons c JOIN prompts p USING (prompt_id)
    WHERE c.method = 'human' AND c.status = 'ok' AND c.p_a IS NOT NULL AND c.p_a <> 0.5
    """,
    # v1's judge_quality plus the 95 % interval `cai judge-eval` now stores in details.
    """
    CREATE OR REPLACE VIEW judge_quality AS
    SELECT subject_id AS judge_spec_hash, json_extract_string(details, '$.judge') AS judge,
           json_extract_string(details, '$.model_id') AS judge_model_id,
           json_extract_string(details, '$.engine') AS engine, dataset,
           TRY_CAST(json_extract_string(details, '$.n') AS INTEGER) AS n, metric, value,
           TRY_CAST(json_extract_string(details, '$.low') AS DOUBLE) AS low,
           TRY_CAST(json_extract_string(details, '$.high') AS DOUBLE) AS high,
           details, run_id, created_at
    FROM evaluations WHERE kind = 'judge_quality'
    """,
    # `cai rm eval` rows: a reward model's agreement with people, with the interval.
    """
    CREATE OR REPLACE VIEW reward_model_quality AS
    SELECT subject_id AS model_id, dataset, metric, value,
           TRY_CAST(json_extract_string(details, '$.low') AS DOUBLE) AS low,
           TRY_CAST(json_extract_string(details, '$.high') AS DOUBLE) AS high,
           TRY_CAST(json_extract_string(details, '$.pairs') AS INTEGER) AS pairs,
           TRY_CAST(json_extract_string(details, '$.interval_n') AS INTEGER) AS interval_n,
           details, run_id, created_at
    FROM evaluations WHERE kind = 'reward_model'
    """,
]

# Version 7 (issue 16): constitution versions. Labels and revisions that an edit did not touch are
# carried over to the new version by `cai label --changed` / `cai critique --changed`: a new row
# under the new constitution hash whose ``carried_from`` names the row that was really computed
# (its label or text is copied, not recomputed). Old versions' rows stay for lineage.
_V7 = [
    "ALTER TABLE comparisons ADD COLUMN IF NOT EXISTS carried_from VARCHAR",
    "ALTER TABLE revisions ADD COLUMN IF NOT EXISTS carried_from VARCHAR",
    # Every comparison with its constitution's name and version, ranked among the labels of the same
    # pair by the same judge and seed under versions of the same constitution (1 = the newest
    # version, by when the store first saw it).
    """
    CREATE OR REPLACE VIEW comparison_versions AS
    SELECT c.*, k.name AS constitution_name, k.version AS constitution_version,
           row_number() OVER w_newest AS version_rank,
           count(*) OVER w_pair AS versions_labelled
    FROM comparisons c LEFT JOIN constitutions k USING (constitution_hash)
    WINDOW w_pair AS (PARTITION BY c.prompt_id, c.pair_kind, c.response_a_id, c.response_b_id, c.judge_name,
                                   c.judge_spec_hash, c.judge_model_id, c.seed, k.name),
           w_newest AS (w_pair ORDER BY k.created_at DESC NULLS LAST, c.created_at DESC, c.comparison_id)
    """,
    # Started from the version-3 definition of `preferences` (human rows left out) (same tie rule and columns), now over
    # the newest constitution version's label of each pair only, and saying so: constitution_name,
    # constitution_version, versions_labelled (how many versions labelled this pair; this row is
    # the newest one's) and carried_from (set when the label was carried over unchanged from an
    # older version's comparison rather than judged again).
    """
    CREATE OR REPLACE VIEW preferences AS
    SELECT c.comparison_id, c.prompt_id, p.prompt_text AS prompt, p.messages,
           CASE WHEN c.p_a > 0.5 THEN c.response_a ELSE c.response_b END AS chosen,
           CASE WHEN c.p_a > 0.5 THEN c.response_b ELSE c.response_a END AS rejected,
           CASE WHEN c.p_a > 0.5 THEN c.response_a_id ELSE c.response_b_id END AS chosen_id,
           CASE WHEN c.p_a > 0.5 THEN c.response_b_id ELSE c.response_a_id END AS rejected_id,
           greatest(c.p_a, 1 - c.p_a) AS probability,
           CASE WHEN c.p_a > 0.5 THEN c.score_a ELSE c.score_b END AS score_chosen,
           CASE WHEN c.p_a > 0.5 THEN c.score_b ELSE c.score_a END AS score_rejected,
           c.principle_ids, c.judge_name, c.judge_spec_hash, c.judge_model_id, c.constitution_hash,
           c.method, c.pair_kind, c.position_consistent, c.run_id, c.created_at,
           c.constitution_name, c.constitution_version, c.versions_labelled, c.carried_from
    FROM comparison_versions c JOIN prompts p USING (prompt_id)
    WHERE c.version_rank = 1 AND c.status = 'ok' AND c.p_a IS NOT NULL AND c.p_a <> 0.5
      AND c.method IS DISTINCT FROM 'human'  -- people's labels: human_preferences (v3)
    """,
]

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, _V1_TABLES + _V1_VIEWS),
    (2, _V2_VIEWS),
    (3, _V3_VIEWS),
    # Issue 15: a run records the process that owns it and a heartbeat, so the next command that opens
    # the store can tell a run whose process is gone (SIGKILL, power loss) and mark it ``stale``.
    (6, ["ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid INTEGER",
         "ALTER TABLE runs ADD COLUMN IF NOT EXISTS heartbeat_at TIMESTAMP"]),
    (7, _V7),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
