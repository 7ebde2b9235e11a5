# /tmp/lampw/todo.pkl: the 114 distinct texts of one dev round, written by lmprof.py (this folder; rng 11, as the lm-new worker)
import os, sys, pickle, importlib.util
sys.path.insert(0, os.getcwd())
import torch
spec = importlib.util.spec_from_file_location("oldlp", "/tmp/lampw/lm_prefix_before_chunk.py"); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
from textleak.components import lm_prefix as new
from textleak.prior import lm_prior, _streamed_ce
lm = lm_prior("smollm2")
todo = pickle.load(open("/tmp/lampw/todo.pkl", "rb"))
seqs = [lm._ids(t) for t in todo]
emb = lm.model.lm_head.emb
ce = lambda h, t, o: _streamed_ce(h, t, emb.rows, emb.num_embeddings, owner=o)
a = old.trie_nll(lm.model, seqs, ce=ce, grouped=True)
for ch in (256, 100, 7):
    b = new.trie_nll(lm.model, seqs, ce=ce, grouped=True, node_chunk=ch)
    print(ch, torch.equal(a, b), (a - b).abs().max().item())
