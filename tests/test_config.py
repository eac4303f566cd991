"The config module: the paper's defaults, presets, every invalid value's error, JSON round-trips, overrides."
import json
import pytest

from cream_nb.core.config import CreamConfig, ConfigError, PRESETS, TASKS, preset, apply_overrides, config_from_dict, save_config, load_config, describe


def test_defaults_are_the_papers():
    c = CreamConfig()
    assert (c.sampling.n_responses, c.sampling.temperature, c.sampling.top_p) == (5, 0.8, 0.95)
    assert (c.dpo.beta, c.dpo.learning_rate, c.dpo.epochs, c.dpo.warmup_ratio) == (0.1, 1e-6, 1, 0.1)
    assert c.sft.epochs == 3
    assert (c.consistency.method, c.consistency.mode, c.consistency.fixed) == ('kendall', 'avg', None)
    assert (c.loop.iterations, c.loop.method) == (2, 'cream')
    assert c.eval.tasks == list(TASKS) == ['arc_easy', 'arc_challenge', 'openbookqa', 'siqa', 'gsm8k']


@pytest.mark.parametrize('name', list(PRESETS))
def test_presets_load_and_round_trip(name, tmp_path):
    c = preset(name)
    assert c.preset == name
    p = save_config(c, tmp_path/'config.json')
    assert load_config(p) == c
    assert json.loads(p.read_text())['preset'] == name
    # the paper's method settings are kept by every preset
    assert (c.dpo.beta, c.consistency.method, c.consistency.mode) == (0.1, 'kendall', 'avg')


def test_preset_models():
    assert preset('tiny').model.name == 'tiny'
    assert preset('cpu-demo').model.name == 'embedded'
    assert preset('paper-llama3').model.name == 'meta-llama/Meta-Llama-3-8B-Instruct'
    assert preset('paper-llama2').model.name == 'meta-llama/Llama-2-7b-chat-hf'
    assert preset('paper-llama3').dpo.learning_rate == 1e-6 and preset('paper-llama3').sft.epochs == 3


@pytest.mark.parametrize('override, message', [
    ('sampling.n_responses=1', 'sampling.n_responses = 1 is invalid: allowed an integer >= 2'),
    ('sampling.temperature=0', 'sampling.temperature = 0 is invalid: allowed a number > 0'),
    ('sampling.temperature=-0.5', 'sampling.temperature = -0.5 is invalid'),
    ('sampling.top_p=1.5', 'sampling.top_p = 1.5 is invalid: allowed 0 < value <= 1'),
    ('dpo.beta=0', 'dpo.beta = 0 is invalid: allowed a number > 0'),
    ('dpo.beta=-1', 'dpo.beta = -1 is invalid'),
    ('consistency.fixed=1.5', 'consistency.fixed = 1.5 is invalid: allowed None or 0 <= value <= 1'),
    ('consistency.fixed=-0.1', 'consistency.fixed = -0.1 is invalid'),
    ('consistency.method="pearson"', "consistency.method = 'pearson' is invalid: allowed one of 'kendall', 'spearman', 'toporder'"),
    ('consistency.mode="max"', "consistency.mode = 'max' is invalid: allowed one of 'avg', 'dyn'"),
    ('loop.iterations=0', 'loop.iterations = 0 is invalid'),
    ('reward.judge_scoring="sample"', "reward.judge_scoring = 'sample' is invalid: allowed one of 'generate', 'expected'"),
    ('eval.tasks=["mmlu"]', "eval.tasks = 'mmlu' is invalid"),
    ('model.finetune="adapter"', "model.finetune = 'adapter' is invalid: allowed one of 'lora', 'full'"),
    ('model.quantization="2bit"', "model.quantization = '2bit' is invalid"),
    ('sft.warmup_ratio=1', 'sft.warmup_ratio = 1 is invalid: allowed 0 <= value < 1'),
    ('dpo.bta=0.2', "unknown field 'bta' in override 'dpo.bta=0.2': dpo has ["),
    ('dop.beta=0.2', "unknown section 'dop' in override"),
    ('dpo.beta', 'must look like section.field=value'),
])
def test_invalid_values_name_the_field_and_the_allowed_range(override, message):
    with pytest.raises(ConfigError) as e: apply_overrides(preset('tiny'), [override])
    assert message in str(e.value)


def test_unknown_preset_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge': choose one of tiny, cpu-demo, paper-llama3, paper-llama2"):
        preset('huge')
    (tmp_path/'bad.json').write_text('{"dpo": {"beta": 0.1,')
    with pytest.raises(ConfigError, match='is not valid JSON'): load_config(tmp_path/'bad.json')
    (tmp_path/'list.json').write_text('[1, 2]')
    with pytest.raises(ConfigError, match='must hold a JSON object'): load_config(tmp_path/'list.json')
    with pytest.raises(ConfigError, match="unknown section\\(s\\) \\['dpoo'\\]"): config_from_dict({'dpoo': {}})
    with pytest.raises(ConfigError, match='does not exist'): load_config(tmp_path/'missing.json')


def test_overrides_parse_json_values():
    c = apply_overrides(CreamConfig(), ['dpo.beta=0.25', 'consistency.fixed=null', 'eval.limit=7', 'model.name=tiny',
                                         'data.tasks=["gsm8k", "siqa"]', 'consistency.fixed=1'])
    assert (c.dpo.beta, c.consistency.fixed, c.eval.limit, c.model.name, c.data.tasks) == (0.25, 1, 7, 'tiny', ['gsm8k', 'siqa'])
    # the original is untouched
    assert CreamConfig().dpo.beta == 0.1


def test_partial_json_takes_defaults(tmp_path):
    (tmp_path/'c.json').write_text(json.dumps({'dpo': {'beta': 0.3}}))
    c = load_config(tmp_path/'c.json')
    assert c.dpo.beta == 0.3 and c.dpo.learning_rate == 1e-6 and c.sampling.n_responses == 5


def test_every_field_has_help():
    lines = describe().splitlines()
    assert len(lines) > 40 and all('  # ' in l and not l.endswith('# ') for l in lines)


def test_judge_scoring_per_preset():
    "cpu-demo reads the expected score (a 135M judge rarely writes 'Score: k'); the paper presets generate, as Yuan et al.; tiny too."
    assert preset('cpu-demo').reward.judge_scoring == 'expected'
    for name in ('tiny', 'paper-llama3', 'paper-llama2', 'paper-llama3-qlora', 'paper-llama2-qlora'):
        assert preset(name).reward.judge_scoring == 'generate', name
    assert apply_overrides(preset('tiny'), ['reward.judge_scoring=expected']).reward.judge_scoring == 'expected'


def test_method_names_are_checked_by_the_registry_when_a_run_starts(tmp_path):
    "config holds plain values (it imports no layer above it); the registry refuses an unknown method or length control."
    from cream_nb.methods.registry import method_for
    from cream_nb.runs.run import CreamRun
    cfg = apply_overrides(preset('tiny'), ['loop.method="ppo"'])          # a config may name anything
    with pytest.raises(ConfigError, match="unknown method 'ppo': known methods are 'cream', 'srlm', 'dpo', 'oracle'"): method_for(cfg)
    with pytest.raises(ConfigError, match="unknown method 'ppo'"): CreamRun(cfg, tmp_path/'run', progress=False)
    assert not (tmp_path/'run').exists()                                  # refused before anything is written
    bad = apply_overrides(preset('tiny'), ['reward.length_control="zipf"'])
    with pytest.raises(ConfigError, match="reward.length_control = 'zipf' is invalid: allowed one of 'off', 'dice'"): method_for(bad)
