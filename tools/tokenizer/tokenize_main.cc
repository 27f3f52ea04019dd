// expertmesh-tokenize: the C++ tokenizer and chat template from the command line.
//
//   expertmesh-tokenize encode --model models/expertmesh-tiny "In the beginning"
//   expertmesh-tokenize decode --model models/expertmesh-tiny 865 281 3762
//   expertmesh-tokenize chat   --model models/expertmesh-tiny --messages chat.json
//   --generation-prompt expertmesh-tokenize bench  --model models/expertmesh-tiny --file
//   data/corpus/valid.txt
//
// `bench` measures encode throughput (first pass: empty BPE cache; second pass: warm cache)
// and decode throughput on a text file, one thread.
#include <CLI/CLI.hpp>
#include <boost/json.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "core/base/file.h"
#include "core/text/chat_template.h"
#include "core/text/tokenizer.h"

namespace {

using expertmesh::ChatTemplate;
using expertmesh::Tokenizer;

std::unique_ptr<Tokenizer> LoadTokenizer(const std::string& model_dir) {
  auto tok = Tokenizer::Load(model_dir + "/tokenizer.json");
  if (!tok.ok()) {
    std::cerr << tok.status() << "\n";
    return nullptr;
  }
  return *std::move(tok);
}

std::string ReadAll(std::istream& in) {
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int Encode(const std::string& model, const std::string& text, bool add_bos, bool show_tokens) {
  auto tok = LoadTokenizer(model);
  if (!tok) return 1;
  std::string input = text == "-" ? ReadAll(std::cin) : text;
  auto ids = tok->Encode(input, add_bos);
  if (!ids.ok()) {
    std::cerr << ids.status() << "\n";
    return 1;
  }
  for (size_t i = 0; i < ids->size(); ++i) {
    std::cout << (i ? " " : "") << (*ids)[i];
    if (show_tokens) std::cout << ":" << tok->TokenText((*ids)[i]).value_or("?");
  }
  std::cout << "\n";
  return 0;
}

int Decode(const std::string& model, const std::vector<int32_t>& ids, bool skip_special) {
  auto tok = LoadTokenizer(model);
  if (!tok) return 1;
  std::cout << tok->Decode(ids, skip_special) << "\n";
  return 0;
}

int Chat(const std::string& model, const std::string& messages_path, bool generation_prompt) {
  auto tmpl = ChatTemplate::FromTokenizerConfig(model + "/tokenizer_config.json");
  if (!tmpl.ok()) {
    std::cerr << tmpl.status() << "\n";
    return 1;
  }
  std::string text;
  if (messages_path == "-") {
    text = ReadAll(std::cin);
  } else {
    absl::StatusOr<std::string> file = expertmesh::base::ReadFile(messages_path);
    if (!file.ok()) {
      std::cerr << file.status() << "\n";
      return 1;
    }
    text = *std::move(file);
  }
  boost::system::error_code ec;
  boost::json::value messages = boost::json::parse(text, ec);
  if (ec || !messages.is_array()) {
    std::cerr << "messages must be a JSON array of {role, content} objects\n";
    return 1;
  }
  auto prompt = tmpl->Apply(messages.get_array(), generation_prompt);
  if (!prompt.ok()) {
    std::cerr << prompt.status() << "\n";
    return 1;
  }
  std::cout << *prompt;
  return 0;
}

int Bench(const std::string& model, const std::string& path) {
  auto tok = LoadTokenizer(model);
  if (!tok) return 1;
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::cerr << "cannot open " << path << "\n";
    return 1;
  }
  std::vector<std::string> lines;
  size_t bytes = 0;
  for (std::string line; std::getline(f, line);) {
    bytes += line.size() + 1;
    lines.push_back(line + "\n");
  }
  using Clock = std::chrono::steady_clock;
  std::vector<std::vector<int32_t>> ids(lines.size());
  size_t n_tokens = 0;
  for (int pass = 0; pass < 2; ++pass) {
    auto start = Clock::now();
    n_tokens = 0;
    for (size_t i = 0; i < lines.size(); ++i) {
      auto r = tok->Encode(lines[i], false);
      if (!r.ok()) {
        std::cerr << "line " << i << ": " << r.status() << "\n";
        return 1;
      }
      n_tokens += r->size();
      ids[i] = *std::move(r);
    }
    double s = std::chrono::duration<double>(Clock::now() - start).count();
    std::printf("encode (%s cache): %zu bytes, %zu tokens, %.3f s, %.2f MB/s, %.0f tokens/s\n",
                pass == 0 ? "cold" : "warm", bytes, n_tokens, s, bytes / s / 1e6, n_tokens / s);
  }
  auto start = Clock::now();
  size_t out_bytes = 0;
  for (const auto& line_ids : ids) out_bytes += tok->Decode(line_ids, false).size();
  double s = std::chrono::duration<double>(Clock::now() - start).count();
  std::printf("decode: %zu tokens, %.3f s, %.0f tokens/s (%zu bytes)\n", n_tokens, s, n_tokens / s,
              out_bytes);
  std::printf("compression: %.2f bytes/token\n", static_cast<double>(bytes) / n_tokens);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ExpertMesh tokenizer and chat template (tokenizer.json, tokenizer_config.json)"};
  app.require_subcommand(1);
  std::string model = "models/expertmesh-tiny";

  auto* encode = app.add_subcommand("encode", "print the token ids of a text ('-': stdin)");
  std::string text;
  bool add_bos = false, show_tokens = false;
  encode->add_option("--model", model, "model directory with tokenizer.json");
  encode->add_option("text", text, "text to encode, '-' for stdin")->required();
  encode->add_flag("--bos", add_bos, "prepend the BOS token");
  encode->add_flag("--tokens", show_tokens, "print id:token pairs");

  auto* decode = app.add_subcommand("decode", "print the text of token ids");
  std::vector<int32_t> ids;
  bool skip_special = false;
  decode->add_option("--model", model, "model directory with tokenizer.json");
  decode->add_option("ids", ids, "token ids")->required();
  decode->add_flag("--skip-special", skip_special, "leave special tokens out");

  auto* chat = app.add_subcommand("chat", "render the chat template for a JSON message list");
  std::string messages;
  bool generation_prompt = false;
  chat->add_option("--model", model, "model directory with tokenizer_config.json");
  chat->add_option("--messages", messages, "JSON file with the messages, '-' for stdin")
      ->required();
  chat->add_flag("--generation-prompt", generation_prompt, "add_generation_prompt=True");

  auto* bench = app.add_subcommand("bench", "encode / decode throughput on a text file");
  std::string file;
  bench->add_option("--model", model, "model directory with tokenizer.json");
  bench->add_option("--file", file, "text file, encoded line by line")->required();

  CLI11_PARSE(app, argc, argv);
  if (*encode) return Encode(model, text, add_bos, show_tokens);
  if (*decode) return Decode(model, ids, skip_special);
  if (*chat) return Chat(model, messages, generation_prompt);
  return Bench(model, file);
}
