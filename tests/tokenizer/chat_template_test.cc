// core/chat_template against transformers' apply_chat_template (and Jinja2 itself for
// template snippets), through tests/data/tokenizers/chat_template_golden.json written by
// tools/tokenizer/make_tokenizer_goldens.py.
#include "core/text/chat_template.h"

#include <gtest/gtest.h>

#include <boost/json.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/base/file.h"

namespace expertmesh {
namespace {

const std::string kSource = EXPERTMESH_SOURCE_DIR;

boost::json::object ReadGolden() {
  absl::StatusOr<std::string> text =
      base::ReadFile(kSource + "/tests/data/tokenizers/chat_template_golden.json");
  EXPECT_TRUE(text.ok()) << text.status();
  if (!text.ok()) return boost::json::object();
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(*text, ec);
  EXPECT_FALSE(ec) << ec.message();
  return v.is_object() ? v.get_object() : boost::json::object();
}

TEST(ChatTemplate, MatchesTransformersApplyChatTemplate) {
  boost::json::object golden = ReadGolden();
  const boost::json::object& templates = golden["templates"].as_object();
  const boost::json::array& conversations = golden["conversations"].as_array();
  int checked = 0, raising = 0;
  for (const boost::json::value& r : golden["results"].as_array()) {
    const boost::json::object& result = r.as_object();
    std::string name(result.at("template").as_string());
    auto tmpl = ChatTemplate::FromTokenizerConfig(kSource + "/" +
                                                  std::string(templates.at(name).as_string()));
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    EXPECT_EQ(tmpl->bos_token(), "<｜begin▁of▁sentence｜>");
    EXPECT_EQ(tmpl->eos_token(), "<｜end▁of▁sentence｜>");
    int64_t conv = result.at("conversation").as_int64();
    bool gen = result.at("add_generation_prompt").as_bool();
    auto text = tmpl->Apply(conversations[conv].as_array(), gen);
    SCOPED_TRACE(name + " conversation " + std::to_string(conv) +
                 (gen ? " with generation prompt" : ""));
    if (result.at("text").is_null()) {  // transformers raises: so must we
      EXPECT_FALSE(text.ok()) << *text;
      EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
      ++raising;
    } else {
      ASSERT_TRUE(text.ok()) << text.status();
      EXPECT_EQ(*text, result.at("text").as_string());
    }
    ++checked;
  }
  EXPECT_GE(checked, 60);
  EXPECT_GT(raising, 0);
}

}  // namespace
}  // namespace expertmesh

namespace expertmesh {
namespace {

// Template snippets beyond the DeepSeek templates, against Jinja2 in transformers' settings.
TEST(ChatTemplate, SnippetsMatchJinja) {
  boost::json::object golden = ReadGolden();
  int index = 0;
  for (const boost::json::value& s : golden["snippets"].as_array()) {
    const boost::json::object& snippet = s.as_object();
    SCOPED_TRACE("snippet " + std::to_string(index++) + ": " +
                 std::string(snippet.at("template").as_string()));
    auto tmpl = ChatTemplate::Create(std::string(snippet.at("template").as_string()), "", "");
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    boost::json::object context = snippet.at("context").as_object();
    boost::json::array messages;
    if (const boost::json::value* m = context.if_contains("messages")) messages = m->as_array();
    context.erase("messages");
    auto text = tmpl->Apply(messages, false, context);
    if (snippet.at("text").is_null()) {
      EXPECT_FALSE(text.ok()) << *text;
    } else {
      ASSERT_TRUE(text.ok()) << text.status();
      EXPECT_EQ(*text, snippet.at("text").as_string());
    }
  }
  EXPECT_GE(index, 15);
}

// Message text is data, never template code: whatever it holds appears verbatim.
TEST(ChatTemplate, MessageContentIsNotInterpreted) {
  auto tmpl = ChatTemplate::FromTokenizerConfig(
      kSource + "/tests/data/reference/deepseek-v3/tokenizer_config.json");
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  std::mt19937 rng(11);
  const std::string pieces[] = {"{{",
                                "}}",
                                "{%",
                                "%}",
                                "{#",
                                "#}",
                                "-",
                                "'",
                                "\"",
                                "\\",
                                "\n",
                                " ",
                                "raise_exception('x')",
                                "ns.x",
                                "<｜User｜>",
                                "日本",
                                "{"};
  std::uniform_int_distribution<int> pick(0, std::size(pieces) - 1), len(0, 12);
  for (int trial = 0; trial < 500; ++trial) {
    std::string content;
    for (int k = len(rng); k > 0; --k) content += pieces[pick(rng)];
    boost::json::array messages;
    messages.push_back({{"role", "user"}, {"content", content}});
    auto text = tmpl->Apply(messages, true);
    ASSERT_TRUE(text.ok()) << text.status();
    ASSERT_EQ(*text, tmpl->bos_token() + "<｜User｜>" + content + "<｜Assistant｜>");
  }
}

TEST(ChatTemplate, ErrorsNameTheirCause) {
  auto tmpl = ChatTemplate::FromTokenizerConfig(
      kSource + "/tests/data/reference/deepseek-v3/tokenizer_config.json");
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  // transformers drops null keys, so DeepSeek-V3's tool-call branch sees no content.
  boost::json::array messages = boost::json::parse(R"([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
       "function": {"name": "f", "arguments": "{}"}}]}])")
                                    .as_array();
  auto text = tmpl->Apply(messages, true);
  ASSERT_FALSE(text.ok());
  EXPECT_NE(text.status().message().find("has no attribute 'content'"), std::string::npos)
      << text.status();

  auto raising = ChatTemplate::Create("{{ raise_exception('Only user and assistant') }}", "", "");
  ASSERT_TRUE(raising.ok());
  auto raised = raising->Apply({}, false);
  EXPECT_EQ(raised.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(raised.status().message().find("Only user and assistant"), std::string::npos);

  // Number literals beyond range (found by chat_template_fuzz: std::stod threw).
  auto huge = ChatTemplate::Create("{{ 1e400 > 1 }}", "", "");
  ASSERT_TRUE(huge.ok()) << huge.status();
  EXPECT_EQ(*huge->Apply({}, false), "True");  // inf, as Python's float literal
  EXPECT_EQ(ChatTemplate::Create("{{ 99999999999999999999 }}", "", "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ChatTemplate::Create("{% if x %}unclosed", "", "").ok());
  EXPECT_FALSE(ChatTemplate::Create("{{ 1 + }}", "", "").ok());
  EXPECT_EQ(ChatTemplate::Create("{% macro m() %}{% endmacro %}", "", "").status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(ChatTemplate::Create("{{ x | wordwrap }}", "", "").status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(ChatTemplate::Create("{{ x is sameas y }}", "", "").status().code(),
            absl::StatusCode::kUnimplemented);
  // Limits: recursion, memory and time stay bounded whatever the template says.
  std::string deep_parens = std::string(5000, '(') + "1" + std::string(5000, ')');
  EXPECT_FALSE(ChatTemplate::Create("{{ " + deep_parens + " }}", "", "").ok());
  // 1000 nested '[' (found by chat_template_fuzz: the parser's recursion overflowed the stack).
  EXPECT_FALSE(ChatTemplate::Create("{{ " + std::string(1000, '[') + " }}", "", "").ok());
  EXPECT_FALSE(ChatTemplate::Create("{{ " + std::string(600, '-') + "1 }}", "", "").ok());
  EXPECT_TRUE(ChatTemplate::Create("{{ [[[[1]]]] }}", "", "").ok());
  std::string deep_ifs;
  for (int k = 0; k < 1000; ++k) deep_ifs += "{% if true %}";
  for (int k = 0; k < 1000; ++k) deep_ifs += "{% endif %}";
  EXPECT_FALSE(ChatTemplate::Create(deep_ifs, "", "").ok());
  for (std::string hostile :
       {"{% for i in range(10000000000) %}{% endfor %}", "{{ 'ab' * 10000000000 }}",
        "{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}"}) {
    auto t = ChatTemplate::Create(hostile, "", "");
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->Apply({}, false).status().code(), absl::StatusCode::kInvalidArgument) << hostile;
  }
  // Integer arithmetic past int64 is an error, never a wrapped value (found by the 30-minute
  // chat_template_fuzz run: signed overflow in `*`; INT64_MIN // -1 would trap).
  for (std::string overflowing :
       {"{{ [11999999999999*9999999999999999] }}", "{{ 9223372036854775807 + 1 }}",
        "{{ -9223372036854775807 - 2 }}", "{{ (-9223372036854775807 - 1) // -1 }}",
        "{{ (-9223372036854775807 - 1) % -1 }}", "{{ -(-9223372036854775807 - 1) }}"}) {
    auto t = ChatTemplate::Create(overflowing, "", "");
    ASSERT_TRUE(t.ok()) << t.status();
    auto out = t->Apply({}, false);
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << overflowing;
    EXPECT_NE(out.status().message().find("integer overflow"), std::string::npos) << out.status();
  }
  for (auto [source, expected] : std::vector<std::pair<std::string, std::string>>{
           {"{{ 9223372036854775806 + 1 }}", "9223372036854775807"},
           {"{{ range(9223372036854775806, 9223372036854775807) | list }}",
            "[9223372036854775806]"},
           {"{{ range(-9223372036854775807, 9223372036854775807, 9223372036854775807) | list }}",
            "[-9223372036854775807, 0]"},
           {"{{ range(5, 0, -2) | list }}", "[5, 3, 1]"},
           {"{{ 1e300 | int > 0 }}", "True"}}) {
    auto t = ChatTemplate::Create(source, "", "");
    ASSERT_TRUE(t.ok()) << t.status();
    auto out = t->Apply({}, false);
    ASSERT_TRUE(out.ok()) << source << ": " << out.status();
    EXPECT_EQ(*out, expected) << source;
  }
  // Total work is bounded (found by the 30-minute chat_template_fuzz run: nested loops under the
  // iteration cap rendered for 30 s under ASan); real conversations stay far below the bound.
  auto heavy = ChatTemplate::Create(
      "{% for i in range(1000) %}{% for j in range(1000) %}{{ i + j }}{% if j > 998 %}{% break "
      "%}{% endif %}{% endfor %}{% endfor %}",
      "", "");
  ASSERT_TRUE(heavy.ok()) << heavy.status();
  auto heavy_out = heavy->Apply({}, false);
  EXPECT_EQ(heavy_out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(heavy_out.status().message().find("steps"), std::string::npos) << heavy_out.status();
  for (const char* model : {"deepseek-v3", "deepseek-r1"}) {
    auto real = ChatTemplate::FromTokenizerConfig(kSource + "/tests/data/reference/" + model +
                                                  "/tokenizer_config.json");
    ASSERT_TRUE(real.ok()) << real.status();
    boost::json::array long_chat;
    for (int k = 0; k < 4000; ++k) {
      long_chat.push_back(boost::json::object{{"role", k % 2 == 0 ? "user" : "assistant"},
                                              {"content", "message " + std::to_string(k)}});
    }
    auto rendered = real->Apply(long_chat, true);
    ASSERT_TRUE(rendered.ok()) << model << ": " << rendered.status();
  }
  EXPECT_EQ(ChatTemplate::FromTokenizerConfig("/nonexistent.json").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace expertmesh
