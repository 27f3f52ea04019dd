// Internal to core/chat_template: the Jinja2-subset interpreter behind ChatTemplate.
//
// Why a header: the interpreter is three readable parts that share these types:
// core/text/jinja_value.cc (Python-like values: truthiness, str/repr, equality, tojson),
// core/text/jinja_parse.cc (template and expression lexers, recursive-descent parsers),
// core/text/jinja_render.cc (the tree-walking renderer: scopes, loops, filters, tests, methods).
// Semantics follow Jinja2 3.1 in transformers' environment (trim_blocks, lstrip_blocks,
// loopcontrols, the default Undefined); errors are absl::Status values, never exceptions.
#ifndef EXPERTMESH_CORE_JINJA_H_
#define EXPERTMESH_CORE_JINJA_H_

#include <boost/json.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/base/status.h"

namespace expertmesh::jinja {

// Limits that keep a hostile or broken template from exhausting the stack, memory or time:
// expression size bounds the parser's and the evaluator's recursion, statement nesting the
// renderer's; loop iterations, range() lengths and string repetition are capped, and so is
// the total work of one rendering: every evaluated expression and rendered node is one step.
inline constexpr size_t kMaxExpressionTokens = 1024;
inline constexpr int kMaxStatementNesting = 128;
inline constexpr int64_t kMaxLoopIterations = int64_t{1} << 20;  // per rendering, in total
inline constexpr int64_t kMaxRangeLength = int64_t{1} << 20;
inline constexpr size_t kMaxStringBytes = size_t{1} << 26;
inline constexpr int64_t kMaxRenderSteps = int64_t{1} << 21;  // per rendering

// InvalidArgument("chat template: <message>").
absl::Status Error(std::string_view message);

// ---------------------------------------------------------------------------------------------
// Values

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // insertion-ordered, small

struct Value {
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace };
  Kind kind = Kind::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;               // kString; for kUndefined: why (for error messages)
  std::shared_ptr<List> list;  // kList
  std::shared_ptr<Dict> dict;  // kDict, kNamespace

  static Value Undefined(std::string why) {
    Value v;
    v.s = std::move(why);
    return v;
  }
  static Value None() { return Of(Kind::kNone); }
  static Value Bool(bool x) {
    Value v = Of(Kind::kBool);
    v.b = x;
    return v;
  }
  static Value Int(int64_t x) {
    Value v = Of(Kind::kInt);
    v.i = x;
    return v;
  }
  static Value Float(double x) {
    Value v = Of(Kind::kFloat);
    v.f = x;
    return v;
  }
  static Value Str(std::string x) {
    Value v = Of(Kind::kString);
    v.s = std::move(x);
    return v;
  }
  static Value MakeList(List x = {}) {
    Value v = Of(Kind::kList);
    v.list = std::make_shared<List>(std::move(x));
    return v;
  }
  static Value MakeDict(Dict x = {}, Kind kind = Kind::kDict) {
    Value v = Of(kind);
    v.dict = std::make_shared<Dict>(std::move(x));
    return v;
  }
  static Value Of(Kind k) {
    Value v;
    v.kind = k;
    return v;
  }

  bool is(Kind k) const { return kind == k; }
  bool numeric() const { return kind == Kind::kInt || kind == Kind::kFloat || kind == Kind::kBool; }
  double as_double() const { return kind == Kind::kFloat ? f : static_cast<double>(as_int()); }
  // A float converts by truncation, saturated to the int64 range (NaN gives 0): casting an
  // out-of-range double is undefined behaviour, and templates are untrusted input.
  int64_t as_int() const {
    if (kind == Kind::kBool) return b;
    if (kind == Kind::kInt) return i;
    if (!(f == f)) return 0;
    if (f >= 9223372036854775807.0) return INT64_MAX;
    if (f <= -9223372036854775808.0) return INT64_MIN;
    return static_cast<int64_t>(f);
  }
  const Value* Find(std::string_view key) const {
    if (!dict) return nullptr;
    for (const auto& [k, v] : *dict) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

const char* TypeName(const Value& v);
Value FromJson(const boost::json::value& j);
bool Truthy(const Value& v);                              // Python truthiness
std::vector<std::string> CodePoints(std::string_view s);  // UTF-8 characters of s
std::string PyStr(const Value& v);                        // str(v): what {{ v }} prints
std::string PyRepr(const Value& v);                       // repr(v)
bool Equal(const Value& a, const Value& b);               // ==
// json.dumps(v, ensure_ascii=False, indent=indent (< 0: none), sort_keys=sort_keys).
absl::StatusOr<std::string> ToJson(const Value& v, int indent, bool sort_keys, int depth = 0);

// ---------------------------------------------------------------------------------------------
// Syntax tree

struct Expr {
  enum class Kind {
    kLiteral,
    kName,
    kList,
    kDict,
    kAttr,
    kSubscript,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNot,
    kNeg,
    kBinary,
    kAnd,
    kOr,
    kCond
  };
  Kind kind;
  Value literal;
  std::string name;  // kName, kAttr, kFilter, kTest (negated tests: "not " prefix), kBinary op
  std::vector<std::unique_ptr<Expr>> args;  // kSlice: object, start?, stop?, step? (null = absent)
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
};
using ExprPtr = std::unique_ptr<Expr>;

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;
struct Node {
  enum class Kind { kText, kOutput, kIf, kFor, kSet, kBreak, kContinue } kind;
  std::string text;                                // kText
  ExprPtr expr;                                    // kOutput, kFor (iterable), kSet (value)
  std::vector<std::pair<ExprPtr, Body>> branches;  // kIf
  Body body, else_body;                            // kFor; kIf else
  std::vector<std::string> loop_vars;              // kFor
  ExprPtr loop_filter;                             // kFor: `for x in xs if cond`
  std::string target, target_attr;                 // kSet: name or name.attr
};

struct Template {
  Body body;
};

// The filters and tests the renderer implements (core/text/jinja_render.cc); the parser rejects
// others with Unimplemented, so an unsupported template fails when it is loaded.
bool IsSupportedFilter(std::string_view name);
bool IsSupportedTest(std::string_view name);

// Parses a template (core/text/jinja_parse.cc).
absl::StatusOr<std::shared_ptr<const Template>> Parse(std::string_view source);
// Renders with the given global variables (core/text/jinja_render.cc).
absl::StatusOr<std::string> Render(const Template& t, const boost::json::object& context);

}  // namespace expertmesh::jinja

#endif  // EXPERTMESH_CORE_JINJA_H_
