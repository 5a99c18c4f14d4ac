// moa: the command-line tool.
//   moa generate  --model PATH [--tokenizer PATH] --prompt TEXT [...]   continue prompts
//   moa tokenize  --tokenizer PATH [--decode]                           ids of stdin's text (or back)
//   moa train-lm  --data FILE... --out DIR [...]                        train or continue a base model
//   moa four-domain --data DIR [--preset quick|full] [--out DIR]         the paper's four-domain run
//   moa route     --moa DIR --data FILE [--base PATH] [--tokenizer PATH] the expert of each prompt
//   moa metrics   --hyp FILE --ref FILE                                 BLEU-4 (sacreBLEU) and ROUGE-L
//   moa data prepare --raw DIR --out DIR                                the published sources -> JSONL
// Models: a Hugging Face checkpoint directory (config.json + model.safetensors), a llama2.c .bin,
// or a moa checkpoint directory written by train-lm.
#include <CLI/CLI.hpp>
#include <moa/moa.hpp>
#include <moa/eval/generate.hpp>
#include <moa/nn/load.hpp>
#include <moa/tokenizer/bpe_trainer.hpp>
#include <moa/tokenizer/gpt2_files.hpp>
#include <moa/tokenizer/load.hpp>
#include <moa/train/lm_trainer.hpp>

#include "four_domain.hpp"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

#ifdef MOA_WITH_CUDA
namespace moa::cuda {
bool linked();  // examples/cuda_backend.cu: the CUDA backend, registered at start-up
}
#endif

namespace {

std::string read_all(std::istream& in) { return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()}; }

// Documents of a text file (one document) or a JSONL file ("text", or instruction/input/output).
std::vector<std::string> read_documents(const fs::path& path) {
  std::ifstream in(path);
  MOA_CHECK(in.good(), moa::IOError, "cannot open ", path.string());
  std::vector<std::string> docs;
  if (path.extension() != ".jsonl") {
    docs.push_back(read_all(in));
    return docs;
  }
  std::string line;
  int64_t no = 0;
  while (std::getline(in, line)) {
    ++no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw moa::IOError(moa::detail::cat(path.string(), ":", no, ": malformed JSON: ", e.what()));
    }
    if (j.contains("text")) {
      docs.push_back(j["text"].get<std::string>());
    } else {
      MOA_CHECK(j.contains("instruction") && j.contains("output"), moa::IOError, path.string(), ":", no,
                ": expected a \"text\" field or \"instruction\" and \"output\" fields");
      std::string d = j["instruction"].get<std::string>();
      if (j.contains("input") && !j["input"].get<std::string>().empty()) d += "\n" + j["input"].get<std::string>();
      docs.push_back(d + "\n" + j["output"].get<std::string>());
    }
  }
  return docs;
}

// --device: where models train and run (cpu, cuda, cuda:N).
moa::Device g_device = moa::Device::cpu();

std::unique_ptr<moa::Tokenizer> open_tokenizer(const std::string& flag, const fs::path& hint) {
  const fs::path p = flag.empty() ? hint : fs::path(flag);
  MOA_CHECK(!p.empty(), moa::ValueError, "no tokenizer: pass --tokenizer");
  return moa::load_tokenizer(p);
}

int cmd_generate(const std::string& model_path, const std::string& tok_path, const std::vector<std::string>& prompts,
                 const moa::eval::GenerateOptions& opt, const std::string& bos_mode, bool show_ids) {
  moa::nn::LoadedModel lm = moa::nn::load_model(model_path);
  lm.model->to(g_device);
  const auto tok = open_tokenizer(tok_path, lm.tokenizer_hint);
  MOA_CHECK(tok->vocab_size() <= lm.model->config().vocab_size, moa::ValueError, "the tokenizer has ", tok->vocab_size(),
            " tokens, the model only ", lm.model->config().vocab_size);
  const bool bos = bos_mode == "yes" || (bos_mode == "auto" && tok->bos_id().has_value() && lm.kind != "hf");
  std::vector<std::vector<int32_t>> ids;
  for (const auto& p : prompts) ids.push_back(tok->encode(p, {.add_bos = bos}));
  moa::eval::GenerateOptions o = opt;
  if (o.stop_tokens.empty()) {
    if (tok->eos_id()) o.stop_tokens.push_back(*tok->eos_id());
    if (lm.kind == "llama2c" && tok->bos_id()) o.stop_tokens.push_back(*tok->bos_id());  // as run.c
  }
  const auto out = moa::eval::generate(*lm.model, ids, o);
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::vector<int32_t> gen = out[i];
    if (!gen.empty() && std::find(o.stop_tokens.begin(), o.stop_tokens.end(), gen.back()) != o.stop_tokens.end())
      gen.pop_back();
    std::string text = prompts[i];
    int32_t prev = ids[i].back();
    for (int32_t t : gen) {
      text += tok->decode_token(t, prev);
      prev = t;
    }
    if (out.size() > 1) std::printf("--- %zu\n", i);
    std::printf("%s\n", text.c_str());
    if (show_ids) {
      for (int32_t t : out[i]) std::printf("%d ", t);
      std::printf("\n");
    }
  }
  return 0;
}

int cmd_tokenize(const std::string& tok_path, bool decode) {
  const auto tok = moa::load_tokenizer(tok_path);
  const std::string in = read_all(std::cin);
  if (decode) {
    std::istringstream ss(in);
    std::vector<int32_t> ids;
    for (int64_t v; ss >> v;) ids.push_back(static_cast<int32_t>(v));
    std::fwrite(tok->decode(ids).data(), 1, tok->decode(ids).size(), stdout);
    return 0;
  }
  const auto ids = tok->encode(in);
  for (std::size_t i = 0; i < ids.size(); ++i) std::printf(i ? " %d" : "%d", ids[i]);
  std::printf("\n");
  return 0;
}

struct TrainArgs {
  std::vector<std::string> data;
  std::string out, model, tokenizer, family = "llama";
  int64_t vocab_size = 4096, dim = 128, layers = 4, heads = 4, kv_heads = 0, context = 256;
  int64_t steps = 1000, batch = 8, seq_len = 128, grad_accum = 1, warmup = 50, eval_every = 100,
          checkpoint_every = 200, log_every = 10;
  double lr = 1e-3, min_lr = 1e-4, weight_decay = 0.1, clip = 1.0, val_fraction = 0.05;
  std::uint64_t seed = 1;
};

int cmd_train_lm(const TrainArgs& a) {
  const fs::path out = a.out;
  fs::create_directories(out);
  std::vector<std::string> docs;
  for (const auto& f : a.data) {
    auto d = read_documents(f);
    docs.insert(docs.end(), d.begin(), d.end());
  }
  MOA_CHECK(!docs.empty(), moa::ValueError, "train-lm: the data holds no documents");
  std::shared_ptr<moa::nn::TransformerLM> model;
  std::unique_ptr<moa::Tokenizer> tok;
  fs::path tok_path;
  nlohmann::json meta = nlohmann::json::object();
  const fs::path ck_dir = out / "checkpoint";
  if (fs::exists(ck_dir / "state.json")) {  // resume this run
    moa::nn::LoadedModel lm = moa::nn::load_model(ck_dir);
    model = lm.model;
    tok_path = lm.tokenizer_hint;
    meta = lm.metadata;
  } else if (!a.model.empty()) {            // continue a pretrained model
    moa::nn::LoadedModel lm = moa::nn::load_model(a.model);
    model = lm.model;
    tok_path = a.tokenizer.empty() ? lm.tokenizer_hint : fs::path(a.tokenizer);
  } else if (!a.tokenizer.empty()) {
    tok_path = a.tokenizer;
  } else {                                   // learn a BPE vocabulary on the training text
    tok_path = out / "tokenizer";
    if (!fs::exists(tok_path / "encoder.json")) {
      std::fprintf(stderr, "training a %lld-token BPE vocabulary on %zu documents\n", static_cast<long long>(a.vocab_size),
                   docs.size());
      const moa::BpeTokenizer bpe = moa::train_bpe(docs, {.vocab_size = static_cast<int32_t>(a.vocab_size)});
      fs::create_directories(tok_path);
      moa::save_gpt2_tokenizer(bpe, tok_path);
    }
  }
  tok = moa::load_tokenizer(tok_path);
  meta["tokenizer"] = fs::absolute(tok_path).string();
  if (!model) {
    moa::nn::TransformerConfig c = a.family == "gpt2" ? moa::nn::TransformerConfig::gpt2() : moa::nn::TransformerConfig::llama();
    c.vocab_size = tok->vocab_size();
    c.max_seq_len = std::max(a.context, a.seq_len);
    c.dim = a.dim;
    c.n_layers = a.layers;
    c.n_heads = a.heads;
    c.n_kv_heads = a.kv_heads;
    c.hidden_dim = a.family == "gpt2" ? 4 * a.dim : (8 * a.dim / 3 + 7) / 8 * 8;
    c.tie_embeddings = true;
    model = std::make_shared<moa::nn::TransformerLM>(c, a.seed);
  }
  // Tokenize: documents joined by EOS (or BOS) into one stream; the last val_fraction validates.
  std::vector<int32_t> stream;
  const auto sep = tok->eos_id() ? tok->eos_id() : tok->bos_id();
  for (const auto& d : docs) {
    const auto ids = tok->encode(d);
    stream.insert(stream.end(), ids.begin(), ids.end());
    if (sep) stream.push_back(*sep);
  }
  const auto n_val = static_cast<std::size_t>(static_cast<double>(stream.size()) * a.val_fraction);
  std::vector<int32_t> train_ids(stream.begin(), stream.end() - static_cast<long>(n_val)),
      val_ids(stream.end() - static_cast<long>(n_val), stream.end());
  std::fprintf(stderr, "%zu documents, %zu training tokens, %zu validation tokens, %lld parameters\n", docs.size(),
               train_ids.size(), val_ids.size(), static_cast<long long>(model->num_parameters()));
  moa::train::PackedTokens train_src(train_ids, a.batch, a.seq_len);
  std::vector<moa::train::Batch> valid;
  if (static_cast<int64_t>(val_ids.size()) > a.seq_len)
    valid = moa::train::PackedTokens(val_ids, a.batch, a.seq_len).sequential(8);
  moa::train::LMTrainOptions opt{.steps = a.steps,
                                 .grad_accum = a.grad_accum,
                                 .adamw = {.lr = a.lr, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = a.weight_decay},
                                 .min_lr = a.min_lr,
                                 .warmup_steps = a.warmup,
                                 .grad_clip = a.clip,
                                 .eval_every = a.eval_every,
                                 .log_every = a.log_every,
                                 .checkpoint_every = a.checkpoint_every,
                                 .checkpoint_dir = ck_dir,
                                 .log_path = out / "train_log.jsonl",
                                 .seed = a.seed};
  model->to(g_device);
  const auto res = moa::train::train_lm(*model, train_src, valid, opt, meta);
  std::fprintf(stderr, "done: final loss %.4f%s; checkpoint in %s\n", res.history.empty() ? 0.0 : res.history.back().loss,
               res.final_val_loss ? (", validation loss " + std::to_string(*res.final_val_loss)).c_str() : "",
               ck_dir.c_str());
  return 0;
}

// The data directory of four-domain: the flag, else $MOA_FOUR_DOMAIN_DATA; a clear message without it.
fs::path four_domain_data(const std::string& flag) {
  const char* env = std::getenv("MOA_FOUR_DOMAIN_DATA");
  const fs::path dir = !flag.empty() ? fs::path(flag) : env && *env ? fs::path(env) : fs::path();
  MOA_CHECK(!dir.empty() && fs::is_directory(dir), moa::IOError,
            "four-domain: no data directory", dir.empty() ? std::string() : " at " + dir.string(),
            ". Pass --data DIR or set MOA_FOUR_DOMAIN_DATA to a folder with <domain>/{train,valid,test}.jsonl. "
            "To make one, download the published source files (README.md, section 'The four-domain data') and run "
            "`moa data prepare --raw <their folder> --out DIR`.");
  return dir;
}

int cmd_route(const fs::path& moa_dir, const std::string& base_flag, const std::string& tok_flag, const fs::path& data_file) {
  std::ifstream in(moa_dir / "moa_config.json");
  MOA_CHECK(in.good(), moa::IOError, "route: cannot open ", (moa_dir / "moa_config.json").string());
  const nlohmann::json cfg = nlohmann::json::parse(in);
  const std::string base_path = !base_flag.empty() ? base_flag : cfg.value("base", "");
  MOA_CHECK(!base_path.empty(), moa::ValueError, "route: the MoA names no base model; pass --base");
  moa::nn::LoadedModel lm = moa::nn::load_model(base_path);
  lm.model->to(g_device);
  const auto tok = open_tokenizer(tok_flag, lm.tokenizer_hint);
  auto m = moa::mixture::load_moa(lm.model, moa_dir);
  const auto exs = moa::data::read_prompts(data_file);
  const auto picks = moa::four_domain::route_examples(*m, *tok, exs);
  int64_t labelled = 0, correct = 0;
  for (std::size_t i = 0; i < exs.size(); ++i) {
    const std::string& chosen = m->config().domains[static_cast<std::size_t>(picks[i])];
    std::printf("%s\t%s", exs[i].id.empty() ? std::to_string(i + 1).c_str() : exs[i].id.c_str(), chosen.c_str());
    if (!exs[i].domain.empty()) {
      ++labelled;
      correct += exs[i].domain == chosen;
      std::printf("\t%s", exs[i].domain.c_str());
    }
    std::printf("\n");
  }
  std::fflush(stdout);
  if (labelled > 0)
    std::fprintf(stderr, "routing accuracy: %.2f%% (%lld of %lld)\n", 100.0 * static_cast<double>(correct) / static_cast<double>(labelled),
                 static_cast<long long>(correct), static_cast<long long>(labelled));
  return 0;
}

int cmd_metrics(const fs::path& hyp, const fs::path& ref, bool json) {
  const auto h = moa::eval::read_lines(hyp), r = moa::eval::read_lines(ref);
  MOA_CHECK(h.size() == r.size(), moa::ValueError, "metrics: ", hyp.string(), " has ", h.size(), " lines, ", ref.string(),
            " has ", r.size(), "; expected one reference line per hypothesis line");
  const auto bleu = moa::eval::corpus_bleu(h, r);
  const double rl = moa::eval::corpus_rouge_l_f(h, r);
  if (json) {
    std::printf("%s\n", nlohmann::json{{"bleu", bleu.score}, {"precisions", bleu.precisions}, {"bp", bleu.bp},
                                       {"sys_len", bleu.sys_len}, {"ref_len", bleu.ref_len}, {"rouge_l_f", rl},
                                       {"segments", h.size()}}.dump().c_str());
  } else {
    std::printf("BLEU = %.2f %.1f/%.1f/%.1f/%.1f (BP = %.3f ratio = %.3f hyp_len = %lld ref_len = %lld)\n", bleu.score,
                bleu.precisions[0], bleu.precisions[1], bleu.precisions[2], bleu.precisions[3], bleu.bp, bleu.ratio,
                static_cast<long long>(bleu.sys_len), static_cast<long long>(bleu.ref_len));
    std::printf("ROUGE-L F = %.4f (mean over %zu segments)\n", rl, h.size());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moa: train and serve one language model for many domains (Mixture-of-LoRAs)"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads (default: OpenMP's choice)");
  std::string device = "cpu", precision = "highest";
  app.add_option("--device", device, "where models train and run: cpu, cuda or cuda:N (cuda needs a moa built with "
                 "-DMOA_CUDA=ON and a GPU)")->capture_default_str();
  app.add_option("--matmul-precision", precision, "float32 products on a GPU: highest, tf32 or bf16 (tensor cores, "
                 "f32 accumulation)")->check(CLI::IsMember({"highest", "tf32", "bf16"}))->capture_default_str();

  auto* gen = app.add_subcommand("generate", "continue prompts with a model");
  std::string model_path, tok_path, bos_mode = "auto";
  std::vector<std::string> prompts;
  moa::eval::GenerateOptions gopt;
  bool show_ids = false;
  std::vector<int32_t> stops;
  gen->add_option("--model,-m", model_path, "HF checkpoint dir, llama2.c .bin, or moa checkpoint dir")->required();
  gen->add_option("--tokenizer,-z", tok_path, "tokenizer file or dir (default: found beside the model)");
  gen->add_option("--prompt,-p", prompts, "prompt text (repeat for a batch)");
  gen->add_option("--max-new-tokens,-n", gopt.max_new_tokens, "tokens to generate")->capture_default_str();
  gen->add_option("--temperature,-t", gopt.temperature, "0 = greedy")->capture_default_str();
  gen->add_option("--top-k", gopt.top_k, "keep the k most likely tokens (0 = all)")->capture_default_str();
  gen->add_option("--top-p", gopt.top_p, "nucleus sampling mass")->capture_default_str();
  gen->add_option("--seed,-s", gopt.seed, "sampling seed")->capture_default_str();
  gen->add_option("--stop-id", stops, "token ids that end generation (default: the tokenizer's EOS)");
  gen->add_option("--bos", bos_mode, "prepend BOS: auto, yes, no")->check(CLI::IsMember({"auto", "yes", "no"}));
  gen->add_flag("--ids", show_ids, "also print the generated token ids");

  auto* tk = app.add_subcommand("tokenize", "print the token ids of stdin's text");
  std::string tk_path;
  bool decode = false;
  tk->add_option("--tokenizer,-z", tk_path, "tokenizer file or dir")->required();
  tk->add_flag("--decode", decode, "read ids from stdin and print their text");

  auto* tr = app.add_subcommand("train-lm", "train (or continue) a base language model on text or JSONL");
  TrainArgs ta;
  tr->add_option("--data", ta.data, ".txt or .jsonl files")->required();
  tr->add_option("--out,-o", ta.out, "run directory (checkpoint, log, tokenizer); resumed if it has a checkpoint")->required();
  tr->add_option("--model", ta.model, "continue this model instead of a new one");
  tr->add_option("--tokenizer", ta.tokenizer, "tokenizer (default: learn a BPE vocabulary on the data)");
  tr->add_option("--vocab-size", ta.vocab_size, "size of the learned vocabulary")->capture_default_str();
  tr->add_option("--family", ta.family, "gpt2 or llama")->check(CLI::IsMember({"gpt2", "llama"}))->capture_default_str();
  tr->add_option("--dim", ta.dim)->capture_default_str();
  tr->add_option("--layers", ta.layers)->capture_default_str();
  tr->add_option("--heads", ta.heads)->capture_default_str();
  tr->add_option("--kv-heads", ta.kv_heads, "0 = heads")->capture_default_str();
  tr->add_option("--context", ta.context, "model context length")->capture_default_str();
  tr->add_option("--steps", ta.steps)->capture_default_str();
  tr->add_option("--batch", ta.batch)->capture_default_str();
  tr->add_option("--seq-len", ta.seq_len)->capture_default_str();
  tr->add_option("--grad-accum", ta.grad_accum)->capture_default_str();
  tr->add_option("--lr", ta.lr)->capture_default_str();
  tr->add_option("--min-lr", ta.min_lr)->capture_default_str();
  tr->add_option("--warmup", ta.warmup)->capture_default_str();
  tr->add_option("--weight-decay", ta.weight_decay)->capture_default_str();
  tr->add_option("--clip", ta.clip)->capture_default_str();
  tr->add_option("--eval-every", ta.eval_every)->capture_default_str();
  tr->add_option("--checkpoint-every", ta.checkpoint_every)->capture_default_str();
  tr->add_option("--log-every", ta.log_every)->capture_default_str();
  tr->add_option("--val-fraction", ta.val_fraction)->capture_default_str();
  tr->add_option("--seed", ta.seed)->capture_default_str();

  auto* fd = app.add_subcommand("four-domain", "the paper's four-domain run: base, five systems, evaluation, report");
  moa::four_domain::Options fo;
  std::string fd_data, fd_out = fo.out_dir.string(), fd_model;
  int64_t s1 = 0, s2 = -1, bsteps = 0, eppl = 0, egen = -1;
  fd->add_option("--data,-d", fd_data, "folder with <domain>/{train,valid,test}.jsonl (default: $MOA_FOUR_DOMAIN_DATA)");
  fd->add_option("--out,-o", fd_out, "run folder (checkpoints, results); an interrupted run resumes from it")->capture_default_str();
  fd->add_option("--preset", fo.preset, "quick (under 15 min on 2 cores), full, or tiny (seconds, a smoke test)")->check(CLI::IsMember({"tiny", "quick", "full"}))->capture_default_str();
  fd->add_option("--model", fd_model, "start from this Hugging Face checkpoint instead of training a base");
  fd->add_option("--seed", fo.seed)->capture_default_str();
  fd->add_option("--s1-steps", s1, "stage-1 steps per domain (default: the preset's)");
  fd->add_option("--s2-steps", s2, "stage-2 steps (default: the preset's)");
  fd->add_option("--base-steps", bsteps, "base pretraining steps (default: the preset's)");
  fd->add_option("--eval-ppl", eppl, "test examples per domain for perplexity and routing");
  fd->add_option("--eval-gen", egen, "test examples per domain answered for BLEU / ROUGE-L");
  fd->add_flag("--quiet", fo.quiet, "no progress lines");

  auto* rt = app.add_subcommand("route", "print the expert each prompt of a JSONL file is routed to");
  std::string rt_moa, rt_base, rt_tok, rt_data;
  rt->add_option("--moa", rt_moa, "a saved MoA folder (four-domain writes <out>/systems/moa)")->required();
  rt->add_option("--data", rt_data, "JSONL or JSON examples (instruction, input; domain scores accuracy)")->required();
  rt->add_option("--base", rt_base, "the base model (default: the one the MoA names)");
  rt->add_option("--tokenizer,-z", rt_tok, "tokenizer (default: the base's)");

  auto* mt = app.add_subcommand("metrics", "BLEU-4 (as sacreBLEU) and ROUGE-L F (as rouge-score) of a hypothesis file");
  std::string mt_hyp, mt_ref;
  bool mt_json = false;
  mt->add_option("--hyp", mt_hyp, "hypotheses, one per line")->required();
  mt->add_option("--ref", mt_ref, "references, one per line")->required();
  mt->add_flag("--json", mt_json, "print JSON");

  auto* dt = app.add_subcommand("data", "instruction data");
  dt->require_subcommand(1);
  auto* dp = dt->add_subcommand("prepare", "convert the published four-domain source files into <out>/<domain>/{train,valid,test}.jsonl");
  std::string dp_raw, dp_out;
  dp->add_option("--raw", dp_raw, "folder with the published files (README.md lists them and where to get them)")->required();
  dp->add_option("--out,-o", dp_out, "output folder (replaced atomically)")->required();

  CLI11_PARSE(app, argc, argv);
  if (threads > 0) moa::set_num_threads(threads);
#ifdef MOA_WITH_CUDA
  (void)moa::cuda::linked();
#endif
  try {
    g_device = moa::parse_device(device);
    if (g_device.type != moa::DeviceType::cpu) (void)moa::backend(g_device);  // fail early with the reason
    moa::set_matmul_precision(precision == "bf16"   ? moa::MatmulPrecision::bf16
                              : precision == "tf32" ? moa::MatmulPrecision::tf32
                                                    : moa::MatmulPrecision::highest);
    if (*gen) {
      gopt.stop_tokens = stops;
      if (prompts.empty()) prompts.push_back("");
      return cmd_generate(model_path, tok_path, prompts, gopt, bos_mode, show_ids);
    }
    if (*tk) return cmd_tokenize(tk_path, decode);
    if (*tr) return cmd_train_lm(ta);
    if (*fd) {
      fo.data_dir = four_domain_data(fd_data);
      fo.out_dir = fd_out;
      fo.model = fd_model;
      fo.device = g_device;
      if (s1 > 0) fo.s1_steps = s1;
      if (s2 >= 0) fo.s2_steps = s2;
      if (bsteps > 0) fo.base_steps = bsteps;
      if (eppl > 0) fo.eval_ppl = eppl;
      if (egen >= 0) fo.eval_gen = egen;
      (void)moa::four_domain::run(fo);
      std::ifstream md(fs::path(fd_out) / "results.md");
      std::cout << md.rdbuf();
      return 0;
    }
    if (*rt) return cmd_route(rt_moa, rt_base, rt_tok, rt_data);
    if (*mt) return cmd_metrics(mt_hyp, mt_ref, mt_json);
    if (*dp) {
      for (const auto& c : moa::data::prepare_four_domain(dp_raw, dp_out))
        std::printf("%-14s train %6zu  valid %4zu  test %4zu  (read %zu, dropped %zu empty, %zu duplicates)\n",
                    c.domain.c_str(), c.train, c.valid, c.test, c.read, c.dropped_empty, c.duplicates);
      return 0;
    }
  } catch (const moa::Error& e) {
    std::fprintf(stderr, "moa: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moa: %s\n", e.what());
    return 1;
  }
  return 0;
}
