"""Train 4 tiny BERT classifiers (random init from a config, no downloads) as one batch with the
transformers Trainer: per-model learning rates, per-model gradient clipping, per-model logged losses.

    pip install 'mbcompile[hf]'
    python examples/hf_trainer.py [--out DIR]
"""
import argparse
import tempfile

import torch
import transformers

import mbcompile
from mbcompile.integrations.hf import BatchedTrainer


def toy_dataset(n, T=16, vocab=100, seed=0):
    """Label = whether token 7 occurs in the sequence."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(8, vocab, (T,), generator=g)
        label = int(torch.rand((), generator=g) < 0.5)
        if label:
            ids[torch.randint(0, T, (1,), generator=g)] = 7
        rows.append({"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.long),
                     "labels": torch.tensor(label)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--epochs", type=float, default=3)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="mbcompile-hf-")

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    models = [transformers.BertForSequenceClassification(cfg) for _ in range(4)]
    batched = mbcompile.batch(models, seeds=range(4))          # each model keeps its own dropout stream

    args = transformers.TrainingArguments(
        out, per_device_train_batch_size=16, num_train_epochs=a.epochs, max_grad_norm=1.0,  # per model
        logging_steps=5, eval_strategy="epoch", save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True)
    trainer = BatchedTrainer(batched, args, train_dataset=toy_dataset(128), eval_dataset=toy_dataset(64, seed=1),
                             optim_cls=torch.optim.AdamW, optim_kwargs={"lr": [1e-4, 3e-4, 1e-3, 3e-3]})
    trainer.train()
    metrics = trainer.evaluate()
    best = min(range(batched.n), key=lambda i: metrics[f"eval_loss_{i}"])
    print({k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_loss")})
    batched.unbatch(best).save_pretrained(f"{out}/best")      # a plain BertForSequenceClassification
    print(f"best model: {best}, saved to {out}/best")


if __name__ == "__main__":
    main()
