"""transformers: tiny BERT / GPT-2 from configs (no downloads) batched vs each model alone, and the
Trainer adapter vs a manual mbcompile loop and vs each model trained alone with torch.optim."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import mbcompile  # noqa: E402
from mbcompile.clip import clip_grad_norm_  # noqa: E402
from mbcompile.optim import optimizer  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-12)
SEEDS = [11, 12, 13]


def bert_config(layers=2, **kw):
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, num_labels=3, **kw)


def gpt2_config(**kw):
    return transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                   use_cache=False, bos_token_id=0, eos_token_id=0, **kw)


def inputs(B=4, T=10):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0                                         # padding: a real attention mask
    return ids, mask


def grads_match(batched, models):
    for i, m in enumerate(models):
        for name, p in m.named_parameters():
            torch.testing.assert_close(batched.get_parameter(name).grad[i], p.grad, **TOL, msg=name)


def test_bert_train_mode_dropout_matches_each_model_alone():
    models = [transformers.BertForSequenceClassification(bert_config()).double().train() for _ in SEEDS]
    batched = mbcompile.batch(models, seeds=SEEDS)            # randomness="sequential"
    assert {k for k, _ in batched.named_buffers()} == {"bert.embeddings.position_ids",
                                                        "bert.embeddings.token_type_ids"}
    assert "bert.embeddings.position_ids" not in batched.state_dict()      # non-persistent stays so
    ids, mask = inputs()
    labels = torch.tensor([0, 2, 1, 2])
    out = batched(input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out, transformers.modeling_outputs.SequenceClassifierOutput)
    assert out.logits.shape == (3, 4, 3) and out.loss.shape == (3,)
    out.loss.sum().backward()
    for i, m in enumerate(models):
        torch.manual_seed(SEEDS[i])                           # model i's own dropout masks
        o = m(input_ids=ids, attention_mask=mask, labels=labels)
        o.loss.backward()
        torch.testing.assert_close(out.logits[i], o.logits, **TOL)
        torch.testing.assert_close(out.loss[i], o.loss, **TOL)
    grads_match(batched, models)
    assert (out.logits[0] - out.logits[1]).abs().max() > 1e-3   # the models really differ


@pytest.fixture(scope="module")
def gpt2_batch():
    torch.manual_seed(0)
    models = [transformers.GPT2LMHeadModel(gpt2_config()).double().train() for _ in SEEDS]
    return models, mbcompile.batch(models, seeds=SEEDS)


def test_gpt2_tied_weights_dropout_and_loss_match_each_model_alone(gpt2_batch):
    models, batched = gpt2_batch
    assert batched.lm_head.weight is batched.transformer.wte.weight           # tied stays tied
    assert "lm_head.weight" in batched.state_dict()
    ids, mask = inputs()
    out = batched(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (3, 4, 10, 100) and out.loss.shape == (3,)

    def lm_loss(logits, t):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 100), t[:, 1:].reshape(-1))

    ours = mbcompile.loss(lm_loss, out.logits, ids, target_in_dim=None)
    ours.sum().backward()
    for i, m in enumerate(models):
        torch.manual_seed(SEEDS[i])
        o = m(input_ids=ids, attention_mask=mask, labels=ids)
        ref = lm_loss(o.logits, ids)
        ref.backward()
        torch.testing.assert_close(out.logits[i], o.logits, **TOL)
        torch.testing.assert_close(ours[i], ref, **TOL)
        # HF's causal-LM loss upcasts logits with .float(): float32 arithmetic on both sides
        torch.testing.assert_close(out.loss[i], o.loss, rtol=1e-5, atol=1e-6)
    grads_match(batched, models)    # lm_head/wte: one stacked tensor gets both gradient contributions


class _Wrapped(torch.nn.Module):
    """A user module around a transformers decoder: no config of its own."""

    def __init__(self):
        super().__init__()
        self.body = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0))

    def forward(self, input_ids, attention_mask, labels):
        return self.body(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "wrapped"])
def test_decoder_with_the_default_use_cache(arch):
    """A decoder's default config returns a key/value cache object: captured with use_cache=False (its
    past_key_values is None), outputs and gradients still each model's own."""
    torch.manual_seed(1)
    if arch == "gpt2":
        make = lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(  # noqa: E731
            vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0))
    elif arch == "llama":
        make = lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(  # noqa: E731
            vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    elif arch == "t5":                  # its decoder stack holds a copy of the config
        make = lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(  # noqa: E731
            vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0))
    else:
        make = _Wrapped
    models = [make().double().eval() for _ in range(2)]
    cfgs = [m.config for m in models[0].modules() if hasattr(m, "config")]
    assert any(c.use_cache for c in cfgs)
    batched = mbcompile.batch(copy.deepcopy(models))
    ids, mask = inputs()
    with pytest.raises(mbcompile.CaptureError, match="called with use_cache=True.*use_cache=False.*unbatch"):
        batched(input_ids=ids, attention_mask=mask, use_cache=True)
    out = batched(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.past_key_values is None
    assert [m.config.use_cache for m in batched._template.modules() if hasattr(m, "config")] == \
        [c.use_cache for c in cfgs]                          # restored after capture
    out.loss.sum().backward()
    for i, m in enumerate(models):
        o = m(input_ids=ids, attention_mask=mask, labels=ids)
        o.loss.backward()
        torch.testing.assert_close(out.logits[i], o.logits, **TOL)
        torch.testing.assert_close(out.loss[i], o.loss, rtol=1e-5, atol=1e-6)
    grads_match(batched, models)


def test_gradient_checkpointing_on_a_list_of_models_trains_each_alone():
    """Each model's gradient-checkpointing hook handles are bookkeeping, not an architecture difference."""
    torch.manual_seed(2)
    models = [transformers.BertForSequenceClassification(bert_config(layers=1)).double() for _ in range(2)]
    for m in models:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.eval()
    batched = mbcompile.batch(copy.deepcopy(models))
    ids, mask = inputs()
    labels = torch.tensor([0, 1, 2, 1])
    out = batched(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.sum().backward()
    for i, m in enumerate(models):
        o = m(input_ids=ids, attention_mask=mask, labels=labels)
        o.loss.backward()
        torch.testing.assert_close(out.logits[i], o.logits, **TOL)
    grads_match(batched, models)


@pytest.mark.parametrize("which", [0, 1])
def test_problem_type_set_on_some_models_must_be_what_the_others_infer(which):
    """problem_type is inferred from the labels on a model's first forward: a model that has run (or was
    set so) batches with ones that have not when the batch infers the same; a model set to another
    (regression, where the labels say classification) is refused, naming the field."""
    torch.manual_seed(3)
    ids, mask = inputs()
    labels = torch.tensor([0, 1, 2, 1])
    models = [transformers.BertForSequenceClassification(bert_config(layers=1)).double().eval() for _ in range(2)]
    models[which](input_ids=ids, attention_mask=mask, labels=labels)        # infers single_label_classification
    assert models[which].config.problem_type == "single_label_classification"
    assert models[1 - which].config.problem_type is None
    out = mbcompile.batch(copy.deepcopy(models))(input_ids=ids, attention_mask=mask, labels=labels)
    for i, m in enumerate(models):
        torch.testing.assert_close(out.loss[i], m(input_ids=ids, attention_mask=mask, labels=labels).loss, **TOL)
    models[1 - which].config.problem_type = None             # it has run now: not inferred yet, again
    models[which].config.problem_type = "regression"
    batched = mbcompile.batch(models)
    with pytest.raises(ValueError, match=f"model {which} has '<root>.config.problem_type' = 'regression'"):
        batched(input_ids=ids, attention_mask=mask, labels=labels)
    models[1 - which].config.problem_type = "multi_label_classification"
    with pytest.raises(ValueError, match="problem_type"):
        mbcompile.batch(models)


def test_unbatch_save_pretrained_roundtrip(gpt2_batch, tmp_path):
    _, batched = gpt2_batch
    with torch.no_grad():
        batched.transformer.wte.weight[1].add_(0.5)
    m = batched.unbatch(1)
    assert type(m) is transformers.GPT2LMHeadModel and m.lm_head.weight is m.transformer.wte.weight
    m.save_pretrained(tmp_path)
    r = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert r.lm_head.weight is r.transformer.wte.weight
    ids, mask = inputs()
    batched.eval()
    with torch.no_grad():
        torch.testing.assert_close(r(input_ids=ids, attention_mask=mask).logits,
                                   batched(input_ids=ids, attention_mask=mask).logits[1], **TOL)
    batched.train()


def test_trainer_matches_manual_loop_and_each_model_alone(tmp_path):
    from mbcompile.integrations.hf import BatchedTrainer
    torch.manual_seed(0)
    models = [transformers.BertForSequenceClassification(bert_config(layers=1)).double() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    ds = [{"input_ids": torch.randint(0, 100, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
           "labels": torch.tensor(i % 3)} for i in range(16)]
    lrs, seeds, clip = [3e-3, 1e-2], [4, 5], 0.3
    batched = mbcompile.batch(models, seeds=seeds)
    manual = copy.deepcopy(batched)
    before = copy.deepcopy(batched.state_dict())
    seen = []

    def collate(features):                       # record the (shuffled) batches the Trainer feeds
        b = transformers.default_data_collator(features)
        seen.append({k: v.clone() for k, v in b.items()})
        return b

    args = transformers.TrainingArguments(
        str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2, max_grad_norm=clip,
        lr_scheduler_type="linear", logging_steps=1, save_strategy="steps", save_steps=2, report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0)
    trainer = BatchedTrainer(batched, args, train_dataset=ds, data_collator=collate, optim_kwargs={"lr": lrs})
    result = trainer.train()
    assert len(seen) == 4

    # the weights moved, per-model logs exist and the aggregate is their mean
    assert any((batched.state_dict()[k] - v).abs().max() > 1e-4 for k, v in before.items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all({"loss_0", "loss_1", "grad_norm_0", "grad_norm_1"} <= h.keys() for h in logs)
    assert logs[0]["loss"] == pytest.approx((logs[0]["loss_0"] + logs[0]["loss_1"]) / 2)
    assert max(h["grad_norm_1"] for h in logs) > clip          # clipping was active
    assert result.training_loss == pytest.approx(trainer.state.log_history[-1]["train_loss"])

    # a manual mbcompile loop on the same batches
    opt = optimizer(manual, torch.optim.AdamW, lr=lrs, weight_decay=0.0)
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=4)
    manual.train()
    losses = []
    for b in seen:
        out = manual(**b)
        losses.append(out.loss.detach())
        out.loss.sum().backward()
        clip_grad_norm_(manual, clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    for k, v in manual.state_dict().items():
        torch.testing.assert_close(batched.state_dict()[k], v, **TOL, msg=k)
    for h, lo in zip(logs, losses):
        assert h["loss_0"] == pytest.approx(lo[0].item(), rel=1e-12)

    # model 1 alone with torch.optim.AdamW and torch's own clipping (a global clip would differ)
    m = models[1].train()
    torch.manual_seed(seeds[1])
    opt1 = torch.optim.AdamW(m.parameters(), lr=lrs[1], weight_decay=0.0)
    sched1 = transformers.get_scheduler("linear", opt1, num_warmup_steps=0, num_training_steps=4)
    for b in seen:
        m(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt1.step()
        sched1.step()
        opt1.zero_grad()
    for name, p in m.named_parameters():
        torch.testing.assert_close(batched.get_parameter(name)[1], p.detach(), rtol=1e-9, atol=1e-11, msg=name)

    # eval: per-model eval losses; save_model writes one save_pretrained folder per model
    metrics = trainer.evaluate(ds[:8])
    assert {"eval_loss", "eval_loss_0", "eval_loss_1"} <= metrics.keys()
    trainer.save_model(str(tmp_path / "final"))
    r = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "final" / "model_0")
    torch.testing.assert_close(r.classifier.weight, batched.classifier.weight[0].detach(), **TOL)

    # resuming from the step-2 checkpoint (weights, optimizer, schedule, random streams) ends on the same weights
    resumed = BatchedTrainer(mbcompile.batch(models, seeds=seeds), args, train_dataset=ds,
                             optim_kwargs={"lr": lrs})
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for k, v in batched.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, **TOL, msg=k)


def test_gradient_accumulation_matches_hf_trainer_on_each_model_alone(tmp_path):
    """With gradient_accumulation_steps > 1 the batch follows what HF's Trainer does for each model alone:
    BERT's forward takes **kwargs, so HF passes num_items_in_batch and does not divide the micro-batch losses
    by the accumulation steps (it sums them); weights and the logged per-step losses match."""
    from mbcompile.integrations.hf import BatchedTrainer
    torch.manual_seed(0)
    models = [transformers.BertForSequenceClassification(
        bert_config(layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).double() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    ds = [{"input_ids": torch.randint(0, 100, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
           "labels": torch.tensor(i % 3)} for i in range(20)]          # 5 micro-batches: a short last window
    lrs = [3e-3, 1e-2]

    def args(d, **kw):
        return transformers.TrainingArguments(
            str(tmp_path / d), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=1,
            max_grad_norm=0.3, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, disable_tqdm=True, seed=0, **kw)
    batched = mbcompile.batch(copy.deepcopy(models), seeds=[4, 5])
    trainer = BatchedTrainer(batched, args("b"), train_dataset=ds, optim_kwargs={"lr": lrs})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for i, m in enumerate(models):
        alone = transformers.Trainer(m, args(f"m{i}", learning_rate=lrs[i]), train_dataset=ds)
        assert alone.model_accepts_loss_kwargs          # HF sums the micro-batch losses here
        alone.train()
        for name, p in m.named_parameters():
            torch.testing.assert_close(batched.get_parameter(name)[i], p.detach(), rtol=1e-9, atol=1e-11, msg=name)
        want = [h for h in alone.state.log_history if "loss" in h]
        assert len(want) == len(logs) == 3
        for h, w in zip(logs, want):                  # HF accumulates its logged loss in float32
            assert h[f"loss_{i}"] == pytest.approx(w["loss"], rel=1e-6)
        want = alone.state.log_history[-1]["train_loss"]
        assert trainer.state.log_history[-1][f"train_loss_{i}"] == pytest.approx(want, rel=1e-6)
