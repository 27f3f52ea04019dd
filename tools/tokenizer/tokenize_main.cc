// expertmesh-tokenize: the C++ tokenizer and chat template from the command line.
//
//   expertmesh-tokenize encode --model models/expertmesh-tiny "In the beginning"
//   expertmesh-tokenize decode --model models/expertmesh-tiny 865 281 3762
//   expertmesh-tokenize chat   --model models/expertmesh-tiny --messages chat.json
//   --generation-prompt expertmesh-tokenize bench  --model models/expertmesh-tiny --file
//   data/corpus/valid.txt
//   expertmesh-tokenize batch  --model models/expertmesh-tiny < requests.jsonl
//
// `bench` measures encode throughput (first pass: empty BPE cache; second pass: warm cache)
// and decode throughput on a text file, one thread.
//
// `batch` answers JSON Lines on stdin, one JSON line on stdout per request, in order, so that a
// test can check thousands of texts against another implementation through one process
// (tests/tokenizer/deepseek_conformance_test.py does, against Hugging Face `tokenizers` and
// Jinja2):
//   {"encode": "text", "bos": false}            -> {"ids": [...]}
//   {"decode": [ids], "skip_special": false}    -> {"text": "...", "stream": "..."}
//       ("stream": the concatenation of Tokenizer::StreamDecoder's pieces, id by id)
//   {"chat": [messages], "add_generation_prompt": false, "context": {...},
//    "drop_null_keys": true}                    -> {"text": "..."}
// A request that fails gets {"error": "..."}; a line that is not such a request, or one longer
// than --max-line-bytes, ends the run with exit status 1.
#include <CLI/CLI.hpp>
#include <boost/json.hpp>
#include <chrono>
#include <climits>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
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

// One line of `in`, without its '\n'; false at the end of input. A line longer than `max_bytes`
// sets *too_long (the line is then incomplete).
bool ReadLine(std::streambuf* in, size_t max_bytes, std::string* line, bool* too_long) {
  line->clear();
  *too_long = false;
  for (;;) {
    int c = in->sbumpc();
    if (c == std::char_traits<char>::eof()) return !line->empty();
    if (c == '\n') return true;
    if (line->size() >= max_bytes) {
      *too_long = true;
      return true;
    }
    line->push_back(static_cast<char>(c));
  }
}

boost::json::object Error(const absl::Status& status) {
  return {{"error", std::string(status.ToString())}};
}

// Answers one request of `batch` (see the file comment). Returns false, with *fatal, on a
// request that is not one.
bool Answer(const boost::json::object& request, const std::string& tokenizer_path,
            const std::string& config_path, std::unique_ptr<Tokenizer>* tok,
            std::optional<ChatTemplate>* tmpl, boost::json::object* answer, std::string* fatal) {
  auto flag = [&](const char* key) {
    const boost::json::value* v = request.if_contains(key);
    return v != nullptr && v->is_bool() && v->get_bool();
  };
  const boost::json::value* encode = request.if_contains("encode");
  const boost::json::value* decode = request.if_contains("decode");
  const boost::json::value* chat = request.if_contains("chat");
  if ((encode || decode) && !*tok) {
    auto loaded = Tokenizer::Load(tokenizer_path);
    if (!loaded.ok()) {
      *fatal = loaded.status().ToString();
      return false;
    }
    *tok = *std::move(loaded);
  }
  if (encode && encode->is_string()) {
    auto ids = (*tok)->Encode(std::string_view(encode->get_string()), flag("bos"));
    if (!ids.ok()) {
      *answer = Error(ids.status());
    } else {
      boost::json::array out;
      out.reserve(ids->size());
      for (int32_t id : *ids) out.push_back(id);
      *answer = {{"ids", std::move(out)}};
    }
    return true;
  }
  if (decode && decode->is_array()) {
    std::vector<int32_t> ids;
    for (const boost::json::value& v : decode->get_array()) {
      if (!v.is_int64() || v.get_int64() < INT32_MIN || v.get_int64() > INT32_MAX) {
        *fatal = "decode: ids must be 32-bit integers";
        return false;
      }
      ids.push_back(static_cast<int32_t>(v.get_int64()));
    }
    bool skip = flag("skip_special");
    Tokenizer::StreamDecoder stream = (*tok)->NewStreamDecoder(skip);
    std::string streamed;
    for (int32_t id : ids) streamed += stream.Push(id);
    streamed += stream.Flush();
    *answer = {{"text", (*tok)->Decode(ids, skip)}, {"stream", std::move(streamed)}};
    return true;
  }
  if (chat && chat->is_array()) {
    if (!tmpl->has_value()) {
      auto loaded = ChatTemplate::FromTokenizerConfig(config_path);
      if (!loaded.ok()) {
        *fatal = loaded.status().ToString();
        return false;
      }
      tmpl->emplace(*std::move(loaded));
    }
    boost::json::object context;
    if (const boost::json::value* c = request.if_contains("context")) {
      if (!c->is_object()) {
        *fatal = "chat: context must be an object";
        return false;
      }
      context = c->get_object();
    }
    bool drop_null_keys = true;
    if (const boost::json::value* d = request.if_contains("drop_null_keys")) {
      drop_null_keys = d->is_bool() && d->get_bool();
    }
    auto text =
        (*tmpl)->Apply(chat->get_array(), flag("add_generation_prompt"), context, drop_null_keys);
    *answer = text.ok() ? boost::json::object{{"text", *std::move(text)}} : Error(text.status());
    return true;
  }
  *fatal = "a request has one of: encode (a string), decode (an array of ids), chat (an array)";
  return false;
}

int Batch(const std::string& tokenizer_path, const std::string& config_path,
          size_t max_line_bytes) {
  std::unique_ptr<Tokenizer> tok;
  std::optional<ChatTemplate> tmpl;
  std::string line;
  bool too_long = false;
  for (size_t n = 1; ReadLine(std::cin.rdbuf(), max_line_bytes, &line, &too_long); ++n) {
    if (too_long) {
      std::cerr << "line " << n << ": longer than --max-line-bytes " << max_line_bytes << "\n";
      return 1;
    }
    boost::system::error_code ec;
    boost::json::value request = boost::json::parse(line, ec);
    if (ec || !request.is_object()) {
      std::cerr << "line " << n << ": not a JSON object" << (ec ? ": " + ec.message() : "") << "\n";
      return 1;
    }
    boost::json::object answer;
    std::string fatal;
    if (!Answer(request.get_object(), tokenizer_path, config_path, &tok, &tmpl, &answer, &fatal)) {
      std::cerr << "line " << n << ": " << fatal << "\n";
      return 1;
    }
    std::cout << boost::json::serialize(answer) << "\n";
  }
  std::cout.flush();
  return std::cout ? 0 : 1;
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

  auto* batch = app.add_subcommand(
      "batch", "answer JSON Lines requests on stdin (encode, decode, chat), one line each");
  std::string tokenizer_path, config_path;
  size_t max_line_bytes = 64 << 20;
  batch->add_option("--model", model, "model directory with tokenizer.json, tokenizer_config.json");
  batch->add_option("--tokenizer", tokenizer_path,
                    "tokenizer.json (default: <model>/tokenizer.json)");
  batch->add_option("--chat-config", config_path,
                    "tokenizer_config.json with the chat template (default: <model>/...)");
  batch->add_option("--max-line-bytes", max_line_bytes, "longest request line accepted")
      ->check(CLI::Range(size_t{1}, size_t{1} << 30));

  CLI11_PARSE(app, argc, argv);
  if (*batch) {
    return Batch(tokenizer_path.empty() ? model + "/tokenizer.json" : tokenizer_path,
                 config_path.empty() ? model + "/tokenizer_config.json" : config_path,
                 max_line_bytes);
  }
  if (*encode) return Encode(model, text, add_bos, show_tokens);
  if (*decode) return Decode(model, ids, skip_special);
  if (*chat) return Chat(model, messages, generation_prompt);
  return Bench(model, file);
}
