// A Jinja2-subset interpreter for chat templates; see core/chat_template.h.
//
// Three stages: Lex (template source -> text / {{ }} / {% %} pieces, applying whitespace
// control, trim_blocks and lstrip_blocks as Jinja's lexer does), Parse (pieces -> statement
// tree; expressions by recursive descent in Jinja's precedence order), Render (tree walk over
// Python-like values). Errors are absl::Status values all the way, no exceptions.
//
// NOTES: semantics follow Jinja2 3.1 with transformers' environment: the default Undefined
// (prints as "", is falsy, iterates as empty, fails in arithmetic and attribute access),
// for-loops open a scope ("set" inside a loop does not leak, hence namespace()), Python
// truthiness, string slicing by code point, and transformers' tojson (json.dumps with
// ensure_ascii=False).
#include "core/chat_template.h"

#include <unicode/utf8.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace expertmesh {
namespace jinja {
namespace {

#define EM_RETURN_IF_ERROR(expr)                       \
  do {                                                 \
    if (absl::Status _s = (expr); !_s.ok()) return _s; \
  } while (0)
#define EM_ASSIGN_OR_RETURN(lhs, expr)          \
  auto lhs##_or = (expr);                       \
  if (!lhs##_or.ok()) return lhs##_or.status(); \
  auto lhs = *std::move(lhs##_or)

absl::Status Error(std::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("chat template: ", std::string(message)));
}

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
  int64_t as_int() const { return kind == Kind::kBool ? b : kind == Kind::kInt ? i : int64_t(f); }
  const Value* Find(std::string_view key) const {
    if (!dict) return nullptr;
    for (const auto& [k, v] : *dict) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

const char* TypeName(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "undefined";
    case Value::Kind::kNone:
      return "NoneType";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kString:
      return "str";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kDict:
      return "dict";
    case Value::Kind::kNamespace:
      return "Namespace";
  }
  return "?";
}

Value FromJson(const boost::json::value& j) {
  switch (j.kind()) {
    case boost::json::kind::null:
      return Value::None();
    case boost::json::kind::bool_:
      return Value::Bool(j.get_bool());
    case boost::json::kind::int64:
      return Value::Int(j.get_int64());
    case boost::json::kind::uint64:
      return Value::Int(static_cast<int64_t>(j.get_uint64()));
    case boost::json::kind::double_:
      return Value::Float(j.get_double());
    case boost::json::kind::string:
      return Value::Str(std::string(j.get_string()));
    case boost::json::kind::array: {
      List l;
      for (const auto& x : j.get_array()) l.push_back(FromJson(x));
      return Value::MakeList(std::move(l));
    }
    case boost::json::kind::object: {
      Dict d;
      for (const auto& [k, x] : j.get_object()) d.emplace_back(std::string(k), FromJson(x));
      return Value::MakeDict(std::move(d));
    }
  }
  return Value::None();
}

bool Truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return false;
    case Value::Kind::kBool:
      return v.b;
    case Value::Kind::kInt:
      return v.i != 0;
    case Value::Kind::kFloat:
      return v.f != 0;
    case Value::Kind::kString:
      return !v.s.empty();
    case Value::Kind::kList:
      return !v.list->empty();
    case Value::Kind::kDict:
      return !v.dict->empty();
    case Value::Kind::kNamespace:
      return true;
  }
  return false;
}

std::vector<std::string> CodePoints(std::string_view s) {
  std::vector<std::string> out;
  int32_t i = 0, n = static_cast<int32_t>(s.size());
  while (i < n) {
    int32_t start = i;
    UChar32 c;
    U8_NEXT(reinterpret_cast<const uint8_t*>(s.data()), i, n, c);
    out.emplace_back(s.substr(start, i - start));
  }
  return out;
}

std::string PyRepr(const Value& v);

// Python's str(): what {{ x }} prints.
std::string PyStr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kString:
      return v.s;
    default:
      return PyRepr(v);
  }
}

std::string PyFloat(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), x);
  std::string s(buf, end);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string PyRepr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kNone:
      return "None";
    case Value::Kind::kBool:
      return v.b ? "True" : "False";
    case Value::Kind::kInt:
      return std::to_string(v.i);
    case Value::Kind::kFloat:
      return PyFloat(v.f);
    case Value::Kind::kString: {
      char q =
          v.s.find('\'') != std::string::npos && v.s.find('"') == std::string::npos ? '"' : '\'';
      std::string out(1, q);
      for (char c : v.s) {
        if (c == q || c == '\\') {
          out += '\\';
          out += c;
        } else if (c == '\n') {
          out += "\\n";
        } else if (c == '\t') {
          out += "\\t";
        } else if (c == '\r') {
          out += "\\r";
        } else {
          out += c;
        }
      }
      return out + q;
    }
    case Value::Kind::kList: {
      std::string out = "[";
      for (size_t k = 0; k < v.list->size(); ++k) {
        out += (k ? ", " : "") + PyRepr((*v.list)[k]);
      }
      return out + "]";
    }
    case Value::Kind::kDict: {
      std::string out = "{";
      for (size_t k = 0; k < v.dict->size(); ++k) {
        out += (k ? ", " : "") + PyRepr(Value::Str((*v.dict)[k].first)) + ": " +
               PyRepr((*v.dict)[k].second);
      }
      return out + "}";
    }
    case Value::Kind::kNamespace:
      return "<Namespace>";
  }
  return "";
}

// json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=sort_keys).
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

absl::StatusOr<std::string> ToJson(const Value& v, int indent, bool sort_keys, int depth) {
  std::string nl, pad, pad_in;
  if (indent >= 0) {
    nl = "\n";
    pad = std::string(depth * indent, ' ');
    pad_in = std::string((depth + 1) * indent, ' ');
  }
  const char* item_sep = indent >= 0 ? "," : ", ";
  switch (v.kind) {
    case Value::Kind::kNone:
      return std::string("null");
    case Value::Kind::kBool:
      return std::string(v.b ? "true" : "false");
    case Value::Kind::kInt:
      return std::to_string(v.i);
    case Value::Kind::kFloat:
      return std::isfinite(v.f) ? PyFloat(v.f)
                                : std::string(v.f != v.f ? "NaN"
                                              : v.f > 0  ? "Infinity"
                                                         : "-Infinity");
    case Value::Kind::kString:
      return JsonString(v.s);
    case Value::Kind::kList: {
      if (v.list->empty()) return std::string("[]");
      std::string out = "[" + nl;
      for (size_t k = 0; k < v.list->size(); ++k) {
        EM_ASSIGN_OR_RETURN(item, ToJson((*v.list)[k], indent, sort_keys, depth + 1));
        out += (k ? item_sep + nl : "") + pad_in + item;
      }
      return out + nl + pad + "]";
    }
    case Value::Kind::kDict:
    case Value::Kind::kNamespace: {
      if (v.dict->empty()) return std::string("{}");
      Dict items = *v.dict;
      if (sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      std::string out = "{" + nl;
      for (size_t k = 0; k < items.size(); ++k) {
        EM_ASSIGN_OR_RETURN(item, ToJson(items[k].second, indent, sort_keys, depth + 1));
        out += (k ? item_sep + nl : "") + pad_in + JsonString(items[k].first) + ": " + item;
      }
      return out + nl + pad + "}";
    }
    case Value::Kind::kUndefined:
      break;
  }
  return Error(absl::StrCat("tojson: cannot serialize ", TypeName(v)));
}

bool Equal(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) return a.as_double() == b.as_double();
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kString:
      return a.s == b.s;
    case Value::Kind::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!Equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    case Value::Kind::kDict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, v] : *a.dict) {
        const Value* o = b.Find(k);
        if (o == nullptr || !Equal(v, *o)) return false;
      }
      return true;
    default:
      return a.dict == b.dict;
  }
}

// ---------------------------------------------------------------------------------------------
// Expressions

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

ExprPtr MakeExpr(Expr::Kind kind, std::string name = {}) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->name = std::move(name);
  return e;
}

struct Tok {
  enum class Kind { kName, kString, kInt, kFloat, kOp, kEnd } kind;
  std::string text;
};

absl::StatusOr<std::vector<Tok>> LexExpr(std::string_view src) {
  std::vector<Tok> out;
  size_t i = 0;
  auto isname = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  while (i < src.size()) {
    char c = src[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < src.size() && isname(src[j])) ++j;
      out.push_back({Tok::Kind::kName, std::string(src.substr(i, j - i))});
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < src.size() &&
             (std::isdigit(static_cast<unsigned char>(src[j])) || src[j] == '.' || src[j] == '_')) {
        if (src[j] == '.') {
          if (is_float || j + 1 >= src.size() ||
              !std::isdigit(static_cast<unsigned char>(src[j + 1])))
            break;
          is_float = true;
        }
        ++j;
      }
      if (j < src.size() && (src[j] == 'e' || src[j] == 'E')) {  // exponent: 1e3, 2.5e-4
        size_t k = j + 1;
        if (k < src.size() && (src[k] == '+' || src[k] == '-')) ++k;
        if (k < src.size() && std::isdigit(static_cast<unsigned char>(src[k]))) {
          while (k < src.size() && std::isdigit(static_cast<unsigned char>(src[k]))) ++k;
          j = k;
          is_float = true;
        }
      }
      std::string num(src.substr(i, j - i));
      num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
      out.push_back({is_float ? Tok::Kind::kFloat : Tok::Kind::kInt, num});
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string s;
      size_t j = i + 1;
      while (j < src.size() && src[j] != c) {
        if (src[j] == '\\' && j + 1 < src.size()) {
          char e = src[++j];
          switch (e) {
            case 'n':
              s += '\n';
              break;
            case 't':
              s += '\t';
              break;
            case 'r':
              s += '\r';
              break;
            case '\\':
              s += '\\';
              break;
            case '\'':
              s += '\'';
              break;
            case '"':
              s += '"';
              break;
            default:
              s += '\\';
              s += e;
          }
        } else {
          s += src[j];
        }
        ++j;
      }
      if (j >= src.size()) return Error("unterminated string literal");
      out.push_back({Tok::Kind::kString, std::move(s)});
      i = j + 1;
    } else {
      static const char* kOps[] = {"==", "!=", "<=", ">=", "//", "**", "+", "-", "*",
                                   "/",  "%",  "~",  "<",  ">",  "(",  ")", "[", "]",
                                   "{",  "}",  ".",  ",",  ":",  "|",  "="};
      bool found = false;
      for (const char* op : kOps) {
        if (src.substr(i).starts_with(op)) {
          out.push_back({Tok::Kind::kOp, op});
          i += strlen(op);
          found = true;
          break;
        }
      }
      if (!found) return Error(absl::StrCat("unexpected character '", std::string(1, c), "'"));
    }
  }
  out.push_back({Tok::Kind::kEnd, ""});
  return out;
}

// Recursive descent in Jinja's precedence order: conditional, or, and, not, comparison,
// + -, ~, * / // %, unary -, postfix (. [] ()) and filters / tests.
class ExprParser {
 public:
  explicit ExprParser(std::vector<Tok> toks) : toks_(std::move(toks)) {}

  absl::StatusOr<ExprPtr> ParseAll() {
    EM_ASSIGN_OR_RETURN(e, ParseExpression());
    if (!AtEnd()) return Error(absl::StrCat("unexpected '", Peek().text, "'"));
    return e;
  }
  absl::StatusOr<ExprPtr> ParseExpression() { return ParseConditional(); }
  absl::StatusOr<ExprPtr> ParseWithoutConditional() { return ParseOr(); }
  bool AtEnd() const { return toks_[pos_].kind == Tok::Kind::kEnd; }
  const Tok& Peek(size_t ahead = 0) const {
    return toks_[std::min(pos_ + ahead, toks_.size() - 1)];
  }
  bool IsOp(std::string_view op, size_t ahead = 0) const {
    return Peek(ahead).kind == Tok::Kind::kOp && Peek(ahead).text == op;
  }
  bool IsName(std::string_view name, size_t ahead = 0) const {
    return Peek(ahead).kind == Tok::Kind::kName && Peek(ahead).text == name;
  }
  bool Accept(std::string_view op) {
    if (IsOp(op)) return ++pos_, true;
    return false;
  }
  bool AcceptName(std::string_view name) {
    if (IsName(name)) return ++pos_, true;
    return false;
  }
  absl::Status Expect(std::string_view op) {
    if (Accept(op)) return absl::OkStatus();
    return Error(absl::StrCat("expected '", std::string(op), "' but got '", Peek().text, "'"));
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Peek().kind != Tok::Kind::kName)
      return Error(absl::StrCat("expected a name, got '", Peek().text, "'"));
    return toks_[pos_++].text;
  }

 private:
  absl::StatusOr<ExprPtr> ParseConditional() {
    EM_ASSIGN_OR_RETURN(value, ParseOr());
    if (!AcceptName("if")) return value;
    EM_ASSIGN_OR_RETURN(cond, ParseOr());
    ExprPtr e = MakeExpr(Expr::Kind::kCond);
    e->args.push_back(std::move(value));
    e->args.push_back(std::move(cond));
    if (AcceptName("else")) {
      EM_ASSIGN_OR_RETURN(other, ParseConditional());
      e->args.push_back(std::move(other));
    }
    return e;
  }
  absl::StatusOr<ExprPtr> ParseOr() {
    EM_ASSIGN_OR_RETURN(left, ParseAnd());
    while (AcceptName("or")) {
      EM_ASSIGN_OR_RETURN(right, ParseAnd());
      left = Binary(Expr::Kind::kOr, "or", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseAnd() {
    EM_ASSIGN_OR_RETURN(left, ParseNot());
    while (AcceptName("and")) {
      EM_ASSIGN_OR_RETURN(right, ParseNot());
      left = Binary(Expr::Kind::kAnd, "and", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseNot() {
    if (AcceptName("not")) {
      EM_ASSIGN_OR_RETURN(operand, ParseNot());
      ExprPtr e = MakeExpr(Expr::Kind::kNot);
      e->args.push_back(std::move(operand));
      return e;
    }
    return ParseCompare();
  }
  absl::StatusOr<ExprPtr> ParseCompare() {
    EM_ASSIGN_OR_RETURN(left, ParseMath1());
    while (true) {
      std::string op;
      if (Peek().kind == Tok::Kind::kOp &&
          (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" ||
           Peek().text == "<=" || Peek().text == ">" || Peek().text == ">=")) {
        op = toks_[pos_++].text;
      } else if (AcceptName("in")) {
        op = "in";
      } else if (IsName("not") && IsName("in", 1)) {
        pos_ += 2;
        op = "not in";
      } else {
        return left;
      }
      EM_ASSIGN_OR_RETURN(right, ParseMath1());
      left = Binary(Expr::Kind::kBinary, op, std::move(left), std::move(right));
    }
  }
  absl::StatusOr<ExprPtr> ParseMath1() {
    EM_ASSIGN_OR_RETURN(left, ParseConcat());
    while (IsOp("+") || IsOp("-")) {
      std::string op = toks_[pos_++].text;
      EM_ASSIGN_OR_RETURN(right, ParseConcat());
      left = Binary(Expr::Kind::kBinary, op, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseConcat() {
    EM_ASSIGN_OR_RETURN(left, ParseMath2());
    while (Accept("~")) {
      EM_ASSIGN_OR_RETURN(right, ParseMath2());
      left = Binary(Expr::Kind::kBinary, "~", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseMath2() {
    EM_ASSIGN_OR_RETURN(left, ParseUnary());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      std::string op = toks_[pos_++].text;
      EM_ASSIGN_OR_RETURN(right, ParseUnary());
      left = Binary(Expr::Kind::kBinary, op, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseUnary() {
    if (Accept("-")) {
      EM_ASSIGN_OR_RETURN(operand, ParseUnary());
      ExprPtr e = MakeExpr(Expr::Kind::kNeg);
      e->args.push_back(std::move(operand));
      return e;
    }
    Accept("+");
    EM_ASSIGN_OR_RETURN(primary, ParsePrimary());
    EM_ASSIGN_OR_RETURN(postfix, ParsePostfix(std::move(primary)));
    return ParseFiltersAndTests(std::move(postfix));
  }
  absl::StatusOr<ExprPtr> ParsePrimary() {
    const Tok& t = Peek();
    switch (t.kind) {
      case Tok::Kind::kString: {
        ++pos_;
        std::string s = t.text;
        while (Peek().kind == Tok::Kind::kString) s += toks_[pos_++].text;  // 'a' 'b'
        return Literal(Value::Str(s));
      }
      case Tok::Kind::kInt: {
        ++pos_;
        int64_t x = 0;
        std::from_chars(t.text.data(), t.text.data() + t.text.size(), x);
        return Literal(Value::Int(x));
      }
      case Tok::Kind::kFloat:
        ++pos_;
        return Literal(Value::Float(std::stod(t.text)));
      case Tok::Kind::kName: {
        ++pos_;
        if (t.text == "true" || t.text == "True") return Literal(Value::Bool(true));
        if (t.text == "false" || t.text == "False") return Literal(Value::Bool(false));
        if (t.text == "none" || t.text == "None") return Literal(Value::None());
        return MakeExpr(Expr::Kind::kName, t.text);
      }
      case Tok::Kind::kOp:
        if (Accept("(")) {
          EM_ASSIGN_OR_RETURN(first, ParseExpression());
          if (!IsOp(",")) {
            EM_RETURN_IF_ERROR(Expect(")"));
            return first;
          }
          ExprPtr tuple = MakeExpr(Expr::Kind::kList);  // tuples behave as lists here
          tuple->args.push_back(std::move(first));
          while (Accept(",") && !IsOp(")")) {
            EM_ASSIGN_OR_RETURN(item, ParseExpression());
            tuple->args.push_back(std::move(item));
          }
          EM_RETURN_IF_ERROR(Expect(")"));
          return tuple;
        }
        if (Accept("[")) {
          ExprPtr list = MakeExpr(Expr::Kind::kList);
          while (!IsOp("]")) {
            EM_ASSIGN_OR_RETURN(item, ParseExpression());
            list->args.push_back(std::move(item));
            if (!Accept(",")) break;
          }
          EM_RETURN_IF_ERROR(Expect("]"));
          return list;
        }
        if (Accept("{")) {
          ExprPtr dict = MakeExpr(Expr::Kind::kDict);
          while (!IsOp("}")) {
            EM_ASSIGN_OR_RETURN(key, ParseExpression());
            EM_RETURN_IF_ERROR(Expect(":"));
            EM_ASSIGN_OR_RETURN(value, ParseExpression());
            dict->args.push_back(std::move(key));
            dict->args.push_back(std::move(value));
            if (!Accept(",")) break;
          }
          EM_RETURN_IF_ERROR(Expect("}"));
          return dict;
        }
        break;
      case Tok::Kind::kEnd:
        break;
    }
    return Error(absl::StrCat("unexpected '", t.text, "' in expression"));
  }
  absl::StatusOr<ExprPtr> ParsePostfix(ExprPtr e) {
    while (true) {
      if (Accept(".")) {
        EM_ASSIGN_OR_RETURN(name, ExpectName());
        ExprPtr attr = MakeExpr(Expr::Kind::kAttr, name);
        attr->args.push_back(std::move(e));
        e = std::move(attr);
      } else if (Accept("[")) {
        std::array<ExprPtr, 3> parts;  // start, stop, step
        bool is_slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!IsOp(":") && !IsOp("]")) {
            EM_ASSIGN_OR_RETURN(part, ParseExpression());
            parts[k] = std::move(part);
          }
          if (k < 2 && Accept(":")) {
            is_slice = true;
          } else {
            break;
          }
        }
        EM_RETURN_IF_ERROR(Expect("]"));
        ExprPtr sub = MakeExpr(is_slice ? Expr::Kind::kSlice : Expr::Kind::kSubscript);
        sub->args.push_back(std::move(e));
        if (is_slice) {
          for (auto& p : parts) sub->args.push_back(std::move(p));
        } else {
          if (!parts[0]) return Error("empty subscript");
          sub->args.push_back(std::move(parts[0]));
        }
        e = std::move(sub);
      } else if (IsOp("(")) {
        ExprPtr call = MakeExpr(Expr::Kind::kCall);
        call->args.push_back(std::move(e));
        EM_RETURN_IF_ERROR(ParseCallArgs(call.get()));
        e = std::move(call);
      } else {
        return e;
      }
    }
  }
  absl::Status ParseCallArgs(Expr* call) {
    EM_RETURN_IF_ERROR(Expect("("));
    while (!IsOp(")")) {
      if (Peek().kind == Tok::Kind::kName && IsOp("=", 1)) {
        std::string key = toks_[pos_].text;
        pos_ += 2;
        EM_ASSIGN_OR_RETURN(value, ParseExpression());
        call->kwargs.emplace_back(key, std::move(value));
      } else {
        EM_ASSIGN_OR_RETURN(value, ParseExpression());
        call->args.push_back(std::move(value));
      }
      if (!Accept(",")) break;
    }
    return Expect(")");
  }
  absl::StatusOr<ExprPtr> ParseFiltersAndTests(ExprPtr e) {
    while (true) {
      if (Accept("|")) {
        EM_ASSIGN_OR_RETURN(name, ExpectName());
        ExprPtr filter = MakeExpr(Expr::Kind::kFilter, name);
        filter->args.push_back(std::move(e));
        if (IsOp("(")) EM_RETURN_IF_ERROR(ParseCallArgs(filter.get()));
        e = std::move(filter);
      } else if (AcceptName("is")) {
        bool negated = AcceptName("not");
        EM_ASSIGN_OR_RETURN(name, ExpectName());
        ExprPtr test = MakeExpr(Expr::Kind::kTest, negated ? "not " + name : name);
        test->args.push_back(std::move(e));
        if (IsOp("(")) {
          EM_RETURN_IF_ERROR(ParseCallArgs(test.get()));
        } else if (Peek().kind == Tok::Kind::kString || Peek().kind == Tok::Kind::kInt ||
                   (Peek().kind == Tok::Kind::kName && !IsName("and") && !IsName("or") &&
                    !IsName("else") && !IsName("if") && !IsName("in") && !IsName("not"))) {
          EM_ASSIGN_OR_RETURN(arg, ParsePrimary());  // e.g. `x is divisibleby 3`
          test->args.push_back(std::move(arg));
        }
        e = std::move(test);
      } else {
        return e;
      }
    }
  }
  static ExprPtr Literal(Value v) {
    ExprPtr e = MakeExpr(Expr::Kind::kLiteral);
    e->literal = std::move(v);
    return e;
  }
  static ExprPtr Binary(Expr::Kind kind, std::string op, ExprPtr a, ExprPtr b) {
    ExprPtr e = MakeExpr(kind, std::move(op));
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  std::vector<Tok> toks_;
  size_t pos_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Statements

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

}  // namespace

struct Template {
  Body body;
};

namespace {

// Lexed template pieces.
struct Piece {
  enum class Kind { kText, kVar, kBlock } kind;
  std::string content;
};

// Splits the source into text / {{ }} / {% %} pieces (comments dropped), applying "-"
// whitespace control, trim_blocks and lstrip_blocks like Jinja's lexer.
absl::StatusOr<std::vector<Piece>> LexTemplate(std::string_view src) {
  std::vector<Piece> out;
  size_t pos = 0;
  auto is_ws = [](char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
  };
  while (pos <= src.size()) {
    size_t tag = std::string_view::npos;
    for (size_t k = src.find('{', pos); k != std::string_view::npos; k = src.find('{', k + 1)) {
      if (k + 1 < src.size() && (src[k + 1] == '{' || src[k + 1] == '%' || src[k + 1] == '#')) {
        tag = k;
        break;
      }
    }
    std::string text(
        src.substr(pos, tag == std::string_view::npos ? std::string_view::npos : tag - pos));
    if (tag == std::string_view::npos) {
      if (!text.empty()) out.push_back({Piece::Kind::kText, std::move(text)});
      break;
    }
    char type = src[tag + 1];
    char sign = tag + 2 < src.size() ? src[tag + 2] : 0;
    if (sign == '-') {
      while (!text.empty() && is_ws(text.back())) text.pop_back();
    } else if (type != '{' && sign != '+') {  // lstrip_blocks
      size_t line = text.rfind('\n');
      size_t l_pos = line == std::string::npos ? 0 : line + 1;
      bool line_starting = pos == 0 || src[pos - 1] == '\n';
      if ((l_pos > 0 || line_starting) &&
          text.find_first_not_of(" \t", l_pos) == std::string::npos) {
        text.resize(l_pos);
      }
    }
    if (!text.empty()) out.push_back({Piece::Kind::kText, std::move(text)});
    // Find the closing delimiter, skipping string literals.
    char close = type == '{' ? '}' : type == '%' ? '%' : '#';
    size_t k = tag + 2;
    char quote = 0;
    size_t end = std::string_view::npos;
    for (; k + 1 < src.size(); ++k) {
      char c = src[k];
      if (type != '#' && quote) {
        if (c == '\\')
          ++k;
        else if (c == quote)
          quote = 0;
      } else if (type != '#' && (c == '\'' || c == '"')) {
        quote = c;
      } else if (c == close && src[k + 1] == '}') {
        end = k;
        break;
      }
    }
    if (end == std::string_view::npos) {
      return Error(absl::StrCat("unclosed tag at offset ", tag));
    }
    size_t inner_begin = tag + 2 + ((sign == '-' || sign == '+') ? 1 : 0);
    bool strip_after = end > inner_begin && src[end - 1] == '-';
    bool keep_newline = end > inner_begin && src[end - 1] == '+';
    size_t inner_end = end - ((strip_after || keep_newline) ? 1 : 0);
    std::string inner(src.substr(inner_begin, inner_end - inner_begin));
    if (type == '{') out.push_back({Piece::Kind::kVar, std::move(inner)});
    if (type == '%') out.push_back({Piece::Kind::kBlock, std::move(inner)});
    pos = end + 2;
    if (strip_after) {
      while (pos < src.size() && is_ws(src[pos])) ++pos;
    } else if (type != '{' && !keep_newline && pos < src.size() && src[pos] == '\n') {
      ++pos;  // trim_blocks
    }
  }
  return out;
}

class TemplateParser {
 public:
  explicit TemplateParser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

  absl::StatusOr<Body> ParseAll() {
    Body body;
    std::string end;
    EM_RETURN_IF_ERROR(ParseBody(&body, {}, &end));
    if (!end.empty()) return Error(absl::StrCat("unexpected {% ", end, " %}"));
    return body;
  }

 private:
  // Parses nodes until a block whose keyword is in `stops`; that keyword goes to *stop and the
  // stop block's expression tokens stay in stop_parser_.
  absl::Status ParseBody(Body* body, const std::vector<std::string>& stops, std::string* stop) {
    while (pos_ < pieces_.size()) {
      const Piece& p = pieces_[pos_++];
      if (p.kind == Piece::Kind::kText) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::kText;
        n->text = p.content;
        body->push_back(std::move(n));
        continue;
      }
      EM_ASSIGN_OR_RETURN(toks, LexExpr(p.content));
      auto parser = std::make_unique<ExprParser>(std::move(toks));
      if (p.kind == Piece::Kind::kVar) {
        EM_ASSIGN_OR_RETURN(e, parser->ParseAll());
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::kOutput;
        n->expr = std::move(e);
        body->push_back(std::move(n));
        continue;
      }
      EM_ASSIGN_OR_RETURN(keyword, parser->ExpectName());
      if (std::find(stops.begin(), stops.end(), keyword) != stops.end()) {
        *stop = keyword;
        stop_parser_ = std::move(parser);
        return absl::OkStatus();
      }
      auto n = std::make_unique<Node>();
      if (keyword == "if") {
        n->kind = Node::Kind::kIf;
        EM_ASSIGN_OR_RETURN(cond, parser->ParseAll());
        std::string end;
        Body branch;
        EM_RETURN_IF_ERROR(ParseBody(&branch, {"elif", "else", "endif"}, &end));
        n->branches.emplace_back(std::move(cond), std::move(branch));
        while (end == "elif") {
          EM_ASSIGN_OR_RETURN(c, stop_parser_->ParseAll());
          Body b;
          EM_RETURN_IF_ERROR(ParseBody(&b, {"elif", "else", "endif"}, &end));
          n->branches.emplace_back(std::move(c), std::move(b));
        }
        if (end == "else") EM_RETURN_IF_ERROR(ParseBody(&n->else_body, {"endif"}, &end));
        if (end != "endif") return Error("missing {% endif %}");
      } else if (keyword == "for") {
        n->kind = Node::Kind::kFor;
        do {
          EM_ASSIGN_OR_RETURN(var, parser->ExpectName());
          n->loop_vars.push_back(var);
        } while (parser->Accept(","));
        if (!parser->AcceptName("in")) return Error("expected 'in' in for");
        // The iterable is parsed without the conditional so that `if` starts a loop filter.
        EM_ASSIGN_OR_RETURN(iter, ParseLoopIterable(parser.get()));
        n->expr = std::move(iter);
        if (parser->AcceptName("if")) {
          EM_ASSIGN_OR_RETURN(filter, parser->ParseExpression());
          n->loop_filter = std::move(filter);
        }
        if (!parser->AtEnd()) return Error("unexpected tokens after for");
        std::string end;
        EM_RETURN_IF_ERROR(ParseBody(&n->body, {"else", "endfor"}, &end));
        if (end == "else") EM_RETURN_IF_ERROR(ParseBody(&n->else_body, {"endfor"}, &end));
        if (end != "endfor") return Error("missing {% endfor %}");
      } else if (keyword == "set") {
        n->kind = Node::Kind::kSet;
        EM_ASSIGN_OR_RETURN(target, parser->ExpectName());
        n->target = target;
        if (parser->Accept(".")) {
          EM_ASSIGN_OR_RETURN(attr, parser->ExpectName());
          n->target_attr = attr;
        }
        if (!parser->Accept("=")) return Error("block {% set %} is not supported");
        EM_ASSIGN_OR_RETURN(value, parser->ParseAll());
        n->expr = std::move(value);
      } else if (keyword == "break" || keyword == "continue") {
        n->kind = keyword == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
      } else if (keyword == "generation") {  // transformers' assistant-mask marker: no output
        std::string end;
        Body inner;
        EM_RETURN_IF_ERROR(ParseBody(&inner, {"endgeneration"}, &end));
        if (end != "endgeneration") return Error("missing {% endgeneration %}");
        for (auto& x : inner) body->push_back(std::move(x));
        continue;
      } else {
        return absl::UnimplementedError(
            absl::StrCat("chat template: unsupported statement {% ", keyword, " %}"));
      }
      body->push_back(std::move(n));
    }
    stop->clear();
    return absl::OkStatus();
  }

  // Jinja parses a loop's iterable without the conditional expression, so that a following
  // `if` starts the loop filter.
  static absl::StatusOr<ExprPtr> ParseLoopIterable(ExprParser* parser) {
    return parser->ParseWithoutConditional();
  }

  std::vector<Piece> pieces_;
  size_t pos_ = 0;
  std::unique_ptr<ExprParser> stop_parser_;
};

// ---------------------------------------------------------------------------------------------
// Rendering

class Renderer {
 public:
  explicit Renderer(std::unordered_map<std::string, Value> globals) {
    scopes_.push_back(std::move(globals));
  }

  absl::Status Render(const Body& body, std::string* out) {
    for (const auto& node : body) {
      if (loop_control_ != LoopControl::kNone) return absl::OkStatus();
      switch (node->kind) {
        case Node::Kind::kText:
          *out += node->text;
          break;
        case Node::Kind::kOutput: {
          EM_ASSIGN_OR_RETURN(v, Eval(*node->expr));
          *out += PyStr(v);
          break;
        }
        case Node::Kind::kIf: {
          bool done = false;
          for (const auto& [cond, branch] : node->branches) {
            EM_ASSIGN_OR_RETURN(c, Eval(*cond));
            if (Truthy(c)) {
              EM_RETURN_IF_ERROR(Render(branch, out));
              done = true;
              break;
            }
          }
          if (!done) EM_RETURN_IF_ERROR(Render(node->else_body, out));
          break;
        }
        case Node::Kind::kFor:
          EM_RETURN_IF_ERROR(RenderFor(*node, out));
          break;
        case Node::Kind::kSet: {
          EM_ASSIGN_OR_RETURN(v, Eval(*node->expr));
          if (node->target_attr.empty()) {
            scopes_.back()[node->target] = std::move(v);
          } else {
            Value ns = Lookup(node->target);
            if (!ns.is(Value::Kind::kNamespace)) {
              return Error(
                  absl::StrCat("cannot assign attribute on non-namespace '", node->target, "'"));
            }
            SetKey(ns.dict.get(), node->target_attr, std::move(v));
          }
          break;
        }
        case Node::Kind::kBreak:
          loop_control_ = LoopControl::kBreak;
          break;
        case Node::Kind::kContinue:
          loop_control_ = LoopControl::kContinue;
          break;
      }
    }
    return absl::OkStatus();
  }

 private:
  enum class LoopControl { kNone, kBreak, kContinue };

  static void SetKey(Dict* d, const std::string& key, Value v) {
    for (auto& [k, x] : *d) {
      if (k == key) {
        x = std::move(v);
        return;
      }
    }
    d->emplace_back(key, std::move(v));
  }

  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      if (auto f = it->find(name); f != it->end()) return f->second;
    }
    return Value::Undefined(absl::StrCat("'", name, "' is undefined"));
  }

  absl::Status RenderFor(const Node& node, std::string* out) {
    EM_ASSIGN_OR_RETURN(iterable, Eval(*node.expr));
    List items;
    if (iterable.is(Value::Kind::kList)) {
      items = *iterable.list;
    } else if (iterable.is(Value::Kind::kDict)) {
      for (const auto& [k, v] : *iterable.dict) items.push_back(Value::Str(k));
    } else if (iterable.is(Value::Kind::kString)) {
      for (std::string& c : CodePoints(iterable.s)) items.push_back(Value::Str(std::move(c)));
    } else if (!iterable.is(Value::Kind::kUndefined) && !iterable.is(Value::Kind::kNone)) {
      return Error(absl::StrCat("'", TypeName(iterable), "' object is not iterable"));
    } else if (iterable.is(Value::Kind::kNone)) {
      return Error("'NoneType' object is not iterable");
    }
    auto bind = [&](std::unordered_map<std::string, Value>* scope,
                    const Value& item) -> absl::Status {
      if (node.loop_vars.size() == 1) {
        (*scope)[node.loop_vars[0]] = item;
        return absl::OkStatus();
      }
      if (!item.is(Value::Kind::kList) || item.list->size() != node.loop_vars.size()) {
        return Error("cannot unpack loop item");
      }
      for (size_t k = 0; k < node.loop_vars.size(); ++k)
        (*scope)[node.loop_vars[k]] = (*item.list)[k];
      return absl::OkStatus();
    };
    if (node.loop_filter) {
      List kept;
      for (const Value& item : items) {
        scopes_.emplace_back();
        absl::Status s = bind(&scopes_.back(), item);
        absl::StatusOr<Value> keep = s.ok() ? Eval(*node.loop_filter) : absl::StatusOr<Value>(s);
        scopes_.pop_back();
        if (!keep.ok()) return keep.status();
        if (Truthy(*keep)) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) return Render(node.else_body, out);
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      scopes_.emplace_back();
      auto& scope = scopes_.back();
      absl::Status s = bind(&scope, items[k]);
      if (s.ok()) {
        scope["loop"] = Value::MakeDict(
            {{"index", Value::Int(k + 1)},
             {"index0", Value::Int(k)},
             {"revindex", Value::Int(n - k)},
             {"revindex0", Value::Int(n - k - 1)},
             {"first", Value::Bool(k == 0)},
             {"last", Value::Bool(k == n - 1)},
             {"length", Value::Int(n)},
             {"previtem", k > 0 ? items[k - 1] : Value::Undefined("no previtem")},
             {"nextitem", k + 1 < n ? items[k + 1] : Value::Undefined("no nextitem")}});
        s = Render(node.body, out);
      }
      scopes_.pop_back();
      EM_RETURN_IF_ERROR(s);
      LoopControl control = loop_control_;
      loop_control_ = LoopControl::kNone;
      if (control == LoopControl::kBreak) break;
    }
    return absl::OkStatus();
  }

  static absl::Status UndefinedError(const Value& v) {
    return Error(v.s.empty() ? "undefined value" : v.s);
  }

  // obj.name / obj[key] on a dict-like value.
  static Value GetItem(const Value& obj, const Value& key) {
    if ((obj.is(Value::Kind::kDict) || obj.is(Value::Kind::kNamespace)) &&
        key.is(Value::Kind::kString)) {
      if (const Value* v = obj.Find(key.s)) return *v;
      return Value::Undefined(absl::StrCat("'dict object' has no attribute '", key.s, "'"));
    }
    if (obj.is(Value::Kind::kList) && key.numeric() && !key.is(Value::Kind::kFloat)) {
      int64_t i = key.as_int(), n = static_cast<int64_t>(obj.list->size());
      if (i < 0) i += n;
      if (i >= 0 && i < n) return (*obj.list)[i];
      return Value::Undefined("list index out of range");
    }
    if (obj.is(Value::Kind::kString) && key.numeric() && !key.is(Value::Kind::kFloat)) {
      std::vector<std::string> cps = CodePoints(obj.s);
      int64_t i = key.as_int(), n = static_cast<int64_t>(cps.size());
      if (i < 0) i += n;
      if (i >= 0 && i < n) return Value::Str(cps[i]);
      return Value::Undefined("string index out of range");
    }
    return Value::Undefined(
        absl::StrCat("'", TypeName(obj), " object' has no attribute '", PyStr(key), "'"));
  }

  absl::StatusOr<Value> Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return e.literal;
      case Expr::Kind::kName:
        return Lookup(e.name);
      case Expr::Kind::kList: {
        List l;
        for (const auto& a : e.args) {
          EM_ASSIGN_OR_RETURN(v, Eval(*a));
          l.push_back(std::move(v));
        }
        return Value::MakeList(std::move(l));
      }
      case Expr::Kind::kDict: {
        Dict d;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          EM_ASSIGN_OR_RETURN(key, Eval(*e.args[k]));
          EM_ASSIGN_OR_RETURN(v, Eval(*e.args[k + 1]));
          if (!key.is(Value::Kind::kString)) return Error("dict keys must be strings");
          SetKey(&d, key.s, std::move(v));
        }
        return Value::MakeDict(std::move(d));
      }
      case Expr::Kind::kAttr:
      case Expr::Kind::kSubscript: {
        EM_ASSIGN_OR_RETURN(obj, Eval(*e.args[0]));
        if (obj.is(Value::Kind::kUndefined)) return UndefinedError(obj);
        if (e.kind == Expr::Kind::kAttr) return GetItem(obj, Value::Str(e.name));
        EM_ASSIGN_OR_RETURN(key, Eval(*e.args[1]));
        return GetItem(obj, key);
      }
      case Expr::Kind::kSlice:
        return EvalSlice(e);
      case Expr::Kind::kCall:
        return EvalCall(e);
      case Expr::Kind::kFilter:
        return EvalFilter(e);
      case Expr::Kind::kTest:
        return EvalTest(e);
      case Expr::Kind::kNot: {
        EM_ASSIGN_OR_RETURN(v, Eval(*e.args[0]));
        return Value::Bool(!Truthy(v));
      }
      case Expr::Kind::kNeg: {
        EM_ASSIGN_OR_RETURN(v, Eval(*e.args[0]));
        if (v.is(Value::Kind::kFloat)) return Value::Float(-v.f);
        if (v.numeric()) return Value::Int(-v.as_int());
        return Error(absl::StrCat("bad operand type for unary -: '", TypeName(v), "'"));
      }
      case Expr::Kind::kAnd: {
        EM_ASSIGN_OR_RETURN(a, Eval(*e.args[0]));
        if (!Truthy(a)) return a;
        return Eval(*e.args[1]);
      }
      case Expr::Kind::kOr: {
        EM_ASSIGN_OR_RETURN(a, Eval(*e.args[0]));
        if (Truthy(a)) return a;
        return Eval(*e.args[1]);
      }
      case Expr::Kind::kCond: {
        EM_ASSIGN_OR_RETURN(c, Eval(*e.args[1]));
        if (Truthy(c)) return Eval(*e.args[0]);
        if (e.args.size() > 2) return Eval(*e.args[2]);
        return Value::Undefined("conditional expression without else");
      }
      case Expr::Kind::kBinary: {
        EM_ASSIGN_OR_RETURN(a, Eval(*e.args[0]));
        EM_ASSIGN_OR_RETURN(b, Eval(*e.args[1]));
        return Binary(e.name, a, b);
      }
    }
    return Error("bad expression");
  }

  static absl::StatusOr<Value> Binary(const std::string& op, const Value& a, const Value& b) {
    using K = Value::Kind;
    if (op == "~") return Value::Str(PyStr(a) + PyStr(b));
    if (op == "==") return Value::Bool(Equal(a, b));
    if (op == "!=") return Value::Bool(!Equal(a, b));
    if (op == "in" || op == "not in") {
      bool found = false;
      if (b.is(K::kString)) {
        if (!a.is(K::kString)) return Error("'in <string>' requires string as left operand");
        found = b.s.find(a.s) != std::string::npos;
      } else if (b.is(K::kList)) {
        found = std::any_of(b.list->begin(), b.list->end(),
                            [&](const Value& x) { return Equal(a, x); });
      } else if (b.is(K::kDict) || b.is(K::kNamespace)) {
        found = a.is(K::kString) && b.Find(a.s) != nullptr;
      } else if (!b.is(K::kUndefined)) {
        return Error(absl::StrCat("argument of type '", TypeName(b), "' is not iterable"));
      }
      return Value::Bool(op == "in" ? found : !found);
    }
    if (a.is(K::kUndefined)) return UndefinedError(a);
    if (b.is(K::kUndefined)) return UndefinedError(b);
    if (op == "<" || op == "<=" || op == ">" || op == ">=") {
      int cmp;
      if (a.numeric() && b.numeric()) {
        cmp = a.as_double() < b.as_double() ? -1 : a.as_double() > b.as_double() ? 1 : 0;
      } else if (a.is(K::kString) && b.is(K::kString)) {
        cmp = a.s.compare(b.s);
      } else {
        return Error(absl::StrCat("'", op, "' not supported between '", TypeName(a), "' and '",
                                  TypeName(b), "'"));
      }
      bool r = op == "<" ? cmp < 0 : op == "<=" ? cmp <= 0 : op == ">" ? cmp > 0 : cmp >= 0;
      return Value::Bool(r);
    }
    if (op == "+") {
      if (a.is(K::kString) && b.is(K::kString)) return Value::Str(a.s + b.s);
      if (a.is(K::kList) && b.is(K::kList)) {
        List l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        return Value::MakeList(std::move(l));
      }
    }
    if (op == "*" && a.is(K::kString) && b.numeric() && !b.is(K::kFloat)) {
      std::string s;
      for (int64_t k = 0; k < b.as_int(); ++k) s += a.s;
      return Value::Str(s);
    }
    if (a.numeric() && b.numeric()) {
      bool is_float = a.is(K::kFloat) || b.is(K::kFloat);
      if (op == "/") {
        if (b.as_double() == 0) return Error("division by zero");
        return Value::Float(a.as_double() / b.as_double());
      }
      if (is_float) {
        double x = a.as_double(), y = b.as_double();
        if (op == "+") return Value::Float(x + y);
        if (op == "-") return Value::Float(x - y);
        if (op == "*") return Value::Float(x * y);
        if (y == 0) return Error("division by zero");
        if (op == "//") return Value::Float(std::floor(x / y));
        if (op == "%") return Value::Float(x - std::floor(x / y) * y);
      } else {
        int64_t x = a.as_int(), y = b.as_int();
        if (op == "+") return Value::Int(x + y);
        if (op == "-") return Value::Int(x - y);
        if (op == "*") return Value::Int(x * y);
        if (y == 0) return Error("division by zero");
        int64_t q = x / y;
        if ((x % y != 0) && ((x < 0) != (y < 0))) --q;  // Python floors
        if (op == "//") return Value::Int(q);
        if (op == "%") return Value::Int(x - q * y);
      }
    }
    return Error(absl::StrCat("unsupported operand types for ", op, ": '", TypeName(a), "' and '",
                              TypeName(b), "'"));
  }

  absl::StatusOr<Value> EvalSlice(const Expr& e) {
    EM_ASSIGN_OR_RETURN(obj, Eval(*e.args[0]));
    std::optional<int64_t> bound[3];
    for (int k = 0; k < 3; ++k) {
      if (!e.args[k + 1]) continue;
      EM_ASSIGN_OR_RETURN(v, Eval(*e.args[k + 1]));
      if (v.is(Value::Kind::kNone)) continue;
      if (!v.numeric() || v.is(Value::Kind::kFloat)) return Error("slice indices must be integers");
      bound[k] = v.as_int();
    }
    List items;
    bool is_string = obj.is(Value::Kind::kString);
    if (is_string) {
      for (std::string& c : CodePoints(obj.s)) items.push_back(Value::Str(std::move(c)));
    } else if (obj.is(Value::Kind::kList)) {
      items = *obj.list;
    } else {
      return Error(absl::StrCat("'", TypeName(obj), "' object is not subscriptable"));
    }
    const int64_t n = static_cast<int64_t>(items.size());
    int64_t step = bound[2].value_or(1);
    if (step == 0) return Error("slice step cannot be zero");
    auto clamp = [&](std::optional<int64_t> x, int64_t fallback) {
      if (!x) return fallback;
      int64_t v = *x < 0 ? *x + n : *x;
      return step > 0 ? std::clamp<int64_t>(v, 0, n) : std::clamp<int64_t>(v, -1, n - 1);
    };
    int64_t start = clamp(bound[0], step > 0 ? 0 : n - 1);
    int64_t stop = clamp(bound[1], step > 0 ? n : -1);
    List picked;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) picked.push_back(items[k]);
    if (!is_string) return Value::MakeList(std::move(picked));
    std::string s;
    for (const Value& c : picked) s += c.s;
    return Value::Str(s);
  }

  struct Args {
    std::vector<Value> positional;
    std::vector<std::pair<std::string, Value>> named;
    const Value* Get(size_t index, std::string_view name) const {
      for (const auto& [k, v] : named) {
        if (k == name) return &v;
      }
      return index < positional.size() ? &positional[index] : nullptr;
    }
  };
  absl::StatusOr<Args> EvalArgs(const Expr& e, size_t first) {
    Args args;
    for (size_t k = first; k < e.args.size(); ++k) {
      EM_ASSIGN_OR_RETURN(v, Eval(*e.args[k]));
      args.positional.push_back(std::move(v));
    }
    for (const auto& [name, x] : e.kwargs) {
      EM_ASSIGN_OR_RETURN(v, Eval(*x));
      args.named.emplace_back(name, std::move(v));
    }
    return args;
  }

  absl::StatusOr<Value> EvalCall(const Expr& e) {
    const Expr& callee = *e.args[0];
    EM_ASSIGN_OR_RETURN(args, EvalArgs(e, 1));
    if (callee.kind == Expr::Kind::kAttr) {  // method call
      EM_ASSIGN_OR_RETURN(obj, Eval(*callee.args[0]));
      return CallMethod(obj, callee.name, args);
    }
    if (callee.kind != Expr::Kind::kName) return Error("only named functions can be called");
    const std::string& f = callee.name;
    if (f == "raise_exception") {
      const Value* m = args.Get(0, "message");
      return Error(absl::StrCat("raise_exception: ", m ? PyStr(*m) : ""));
    }
    if (f == "namespace" || f == "dict") {
      Value ns =
          Value::MakeDict({}, f == "namespace" ? Value::Kind::kNamespace : Value::Kind::kDict);
      for (auto& [k, v] : args.named) SetKey(ns.dict.get(), k, v);
      return ns;
    }
    if (f == "range") {
      std::vector<int64_t> r;
      for (const Value& v : args.positional) {
        if (!v.numeric() || v.is(Value::Kind::kFloat)) return Error("range() needs integers");
        r.push_back(v.as_int());
      }
      int64_t start = r.size() > 1 ? r[0] : 0, stop = r.size() == 1  ? r[0]
                                                      : r.size() > 1 ? r[1]
                                                                     : 0;
      int64_t step = r.size() > 2 ? r[2] : 1;
      if (step == 0 || r.empty()) return Error("bad range()");
      List l;
      for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) l.push_back(Value::Int(k));
      return Value::MakeList(std::move(l));
    }
    Value fn = Lookup(f);
    if (fn.is(Value::Kind::kUndefined)) return Error(absl::StrCat("'", f, "' is undefined"));
    return Error(absl::StrCat("'", f, "' is not callable"));
  }

  static absl::StatusOr<Value> CallMethod(const Value& obj, const std::string& m,
                                          const Args& args) {
    using K = Value::Kind;
    if (obj.is(K::kUndefined)) return UndefinedError(obj);
    if (obj.is(K::kString)) {
      const std::string& s = obj.s;
      auto arg_str = [&](size_t i, std::string_view name) -> std::optional<std::string> {
        const Value* v = args.Get(i, name);
        if (v == nullptr || v->is(K::kNone)) return std::nullopt;
        return PyStr(*v);
      };
      if (m == "strip" || m == "lstrip" || m == "rstrip") {
        std::string chars = arg_str(0, "chars").value_or(" \t\n\r\v\f");
        size_t b = m == "rstrip" ? 0 : s.find_first_not_of(chars);
        if (b == std::string::npos) return Value::Str("");
        size_t e = m == "lstrip" ? s.size() : s.find_last_not_of(chars) + 1;
        return Value::Str(s.substr(b, e - b));
      }
      if (m == "upper" || m == "lower") {
        std::string r = s;
        for (char& c : r)
          c = m == "upper" ? std::toupper(static_cast<unsigned char>(c))
                           : std::tolower(static_cast<unsigned char>(c));
        return Value::Str(r);
      }
      if (m == "startswith" || m == "endswith") {
        std::string x = arg_str(0, "prefix").value_or(arg_str(0, "suffix").value_or(""));
        return Value::Bool(m == "startswith" ? s.starts_with(x) : s.ends_with(x));
      }
      if (m == "replace") {
        std::string from = arg_str(0, "old").value_or(""), to = arg_str(1, "new").value_or("");
        if (from.empty()) return Error("replace() with an empty pattern is not supported");
        std::string r;
        size_t last = 0;
        for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, last)) {
          r.append(s, last, p - last).append(to);
          last = p + from.size();
        }
        return Value::Str(r.append(s, last));
      }
      if (m == "split" || m == "rsplit") {
        std::optional<std::string> sep = arg_str(0, "sep");
        const Value* maxsplit_v = args.Get(1, "maxsplit");
        int64_t maxsplit = maxsplit_v && maxsplit_v->numeric() ? maxsplit_v->as_int() : -1;
        List parts;
        if (sep) {
          if (sep->empty()) return Error("empty separator");
          if (m == "split") {
            size_t last = 0;
            for (size_t p = s.find(*sep); p != std::string::npos && maxsplit != 0;
                 p = s.find(*sep, last), --maxsplit) {
              parts.push_back(Value::Str(s.substr(last, p - last)));
              last = p + sep->size();
            }
            parts.push_back(Value::Str(s.substr(last)));
          } else {
            size_t end = s.size();
            while (maxsplit != 0) {
              size_t p = end >= sep->size() ? s.rfind(*sep, end - sep->size()) : std::string::npos;
              if (p == std::string::npos) break;
              parts.insert(parts.begin(),
                           Value::Str(s.substr(p + sep->size(), end - p - sep->size())));
              end = p;
              --maxsplit;
            }
            parts.insert(parts.begin(), Value::Str(s.substr(0, end)));
          }
        } else {
          std::istringstream in(s);
          std::string word;
          while (in >> word) parts.push_back(Value::Str(word));
        }
        return Value::MakeList(std::move(parts));
      }
      if (m == "title" || m == "capitalize") {
        std::string r = s;
        bool start = true;
        for (size_t k = 0; k < r.size(); ++k) {
          unsigned char c = r[k];
          if (m == "capitalize") {
            r[k] = k == 0 ? std::toupper(c) : std::tolower(c);
          } else {
            r[k] = start ? std::toupper(c) : std::tolower(c);
            start = !std::isalpha(c);
          }
        }
        return Value::Str(r);
      }
    }
    if (obj.is(K::kDict)) {
      if (m == "items" || m == "keys" || m == "values") {
        List l;
        for (const auto& [k, v] : *obj.dict) {
          if (m == "items") l.push_back(Value::MakeList({Value::Str(k), v}));
          if (m == "keys") l.push_back(Value::Str(k));
          if (m == "values") l.push_back(v);
        }
        return Value::MakeList(std::move(l));
      }
      if (m == "get") {
        const Value* key = args.Get(0, "key");
        const Value* fallback = args.Get(1, "default");
        if (key && key->is(K::kString)) {
          if (const Value* v = obj.Find(key->s)) return *v;
        }
        return fallback ? *fallback : Value::None();
      }
    }
    return Error(absl::StrCat("'", TypeName(obj), "' object has no method '", m, "'"));
  }

  absl::StatusOr<Value> EvalFilter(const Expr& e) {
    using K = Value::Kind;
    EM_ASSIGN_OR_RETURN(v, Eval(*e.args[0]));
    EM_ASSIGN_OR_RETURN(args, EvalArgs(e, 1));
    const std::string& f = e.name;
    if (f == "default" || f == "d") {
      const Value* fallback = args.Get(0, "default_value");
      const Value* boolean = args.Get(1, "boolean");
      bool use = v.is(K::kUndefined) || (boolean && Truthy(*boolean) && !Truthy(v));
      return use ? (fallback ? *fallback : Value::Str("")) : v;
    }
    if (v.is(K::kUndefined) && f != "string" && f != "length" && f != "count")
      return UndefinedError(v);
    if (f == "trim") return CallMethod(Value::Str(PyStr(v)), "strip", args);
    if (f == "upper" || f == "lower" || f == "title" || f == "capitalize") {
      return CallMethod(Value::Str(PyStr(v)), f, {});
    }
    if (f == "replace") return CallMethod(Value::Str(PyStr(v)), "replace", args);
    if (f == "string") return Value::Str(PyStr(v));
    if (f == "safe") return v;
    if (f == "int") {
      if (v.numeric()) return Value::Int(v.as_int());
      int64_t x = 0;
      if (v.is(K::kString)) std::from_chars(v.s.data(), v.s.data() + v.s.size(), x);
      return Value::Int(x);
    }
    if (f == "length" || f == "count") {
      if (v.is(K::kString)) return Value::Int(static_cast<int64_t>(CodePoints(v.s).size()));
      if (v.is(K::kList)) return Value::Int(static_cast<int64_t>(v.list->size()));
      if (v.is(K::kDict)) return Value::Int(static_cast<int64_t>(v.dict->size()));
      if (v.is(K::kUndefined)) return Value::Int(0);
      return Error(absl::StrCat("object of type '", TypeName(v), "' has no len()"));
    }
    if (f == "first" || f == "last") {
      if (v.is(K::kList)) {
        if (v.list->empty()) return Value::Undefined("empty sequence");
        return f == "first" ? v.list->front() : v.list->back();
      }
      if (v.is(K::kString)) {
        std::vector<std::string> cps = CodePoints(v.s);
        if (cps.empty()) return Value::Undefined("empty string");
        return Value::Str(f == "first" ? cps.front() : cps.back());
      }
    }
    if (f == "list") {
      if (v.is(K::kList)) return v;
      List l;
      if (v.is(K::kString)) {
        for (std::string& c : CodePoints(v.s)) l.push_back(Value::Str(std::move(c)));
      } else if (v.is(K::kDict)) {
        for (const auto& [k, x] : *v.dict) l.push_back(Value::Str(k));
      }
      return Value::MakeList(std::move(l));
    }
    if (f == "join" && v.is(K::kList)) {
      const Value* sep = args.Get(0, "d");
      std::string s;
      for (size_t k = 0; k < v.list->size(); ++k)
        s += (k ? (sep ? PyStr(*sep) : "") : "") + PyStr((*v.list)[k]);
      return Value::Str(s);
    }
    if (f == "items" && v.is(K::kDict)) return CallMethod(v, "items", {});
    if (f == "tojson") {
      const Value* indent = args.Get(0, "indent");
      const Value* sort_keys = args.Get(3, "sort_keys");
      int ind = indent && indent->numeric() ? static_cast<int>(indent->as_int()) : -1;
      EM_ASSIGN_OR_RETURN(s, ToJson(v, ind, sort_keys && Truthy(*sort_keys), 0));
      return Value::Str(s);
    }
    return absl::UnimplementedError(
        absl::StrCat("chat template: unsupported filter '", f, "' on ", TypeName(v)));
  }

  absl::StatusOr<Value> EvalTest(const Expr& e) {
    using K = Value::Kind;
    bool negated = e.name.starts_with("not ");
    std::string t = negated ? e.name.substr(4) : e.name;
    EM_ASSIGN_OR_RETURN(v, Eval(*e.args[0]));
    EM_ASSIGN_OR_RETURN(args, EvalArgs(e, 1));
    bool r;
    if (t == "defined")
      r = !v.is(K::kUndefined);
    else if (t == "undefined")
      r = v.is(K::kUndefined);
    else if (t == "none")
      r = v.is(K::kNone);
    else if (t == "string")
      r = v.is(K::kString);
    else if (t == "number")
      r = v.numeric() && !v.is(K::kBool);
    else if (t == "integer")
      r = v.is(K::kInt);
    else if (t == "float")
      r = v.is(K::kFloat);
    else if (t == "boolean")
      r = v.is(K::kBool);
    else if (t == "true")
      r = v.is(K::kBool) && v.b;
    else if (t == "false")
      r = v.is(K::kBool) && !v.b;
    else if (t == "mapping")
      r = v.is(K::kDict);
    else if (t == "sequence")
      r = v.is(K::kList) || v.is(K::kString) || v.is(K::kDict);
    else if (t == "iterable")
      r = v.is(K::kList) || v.is(K::kString) || v.is(K::kDict);
    else if (t == "even" || t == "odd") {
      if (!v.numeric()) return Error("even/odd test needs a number");
      r = (v.as_int() % 2 == 0) == (t == "even");
    } else if (t == "eq" || t == "equalto" || t == "==") {
      if (args.positional.empty()) return Error("eq test needs an argument");
      r = Equal(v, args.positional[0]);
    } else {
      return absl::UnimplementedError(absl::StrCat("chat template: unsupported test '", t, "'"));
    }
    return Value::Bool(negated ? !r : r);
  }

  std::vector<std::unordered_map<std::string, Value>> scopes_;
  LoopControl loop_control_ = LoopControl::kNone;
};

}  // namespace

absl::StatusOr<std::shared_ptr<const Template>> Parse(std::string_view source) {
  EM_ASSIGN_OR_RETURN(pieces, LexTemplate(source));
  TemplateParser parser(std::move(pieces));
  EM_ASSIGN_OR_RETURN(body, parser.ParseAll());
  auto t = std::make_shared<Template>();
  t->body = std::move(body);
  return std::shared_ptr<const Template>(std::move(t));
}

absl::StatusOr<std::string> Render(const Template& t, const boost::json::object& context) {
  std::unordered_map<std::string, Value> globals;
  for (const auto& [k, v] : context) globals[std::string(k)] = FromJson(v);
  Renderer r(std::move(globals));
  std::string out;
  EM_RETURN_IF_ERROR(r.Render(t.body, &out));
  return out;
}

}  // namespace jinja

// ---------------------------------------------------------------------------------------------

ChatTemplate::ChatTemplate(std::shared_ptr<const jinja::Template> tmpl, std::string bos,
                           std::string eos)
    : template_(std::move(tmpl)), bos_token_(std::move(bos)), eos_token_(std::move(eos)) {}

absl::StatusOr<ChatTemplate> ChatTemplate::Create(std::string_view source, std::string bos_token,
                                                  std::string eos_token) {
  absl::StatusOr<std::shared_ptr<const jinja::Template>> t = jinja::Parse(source);
  if (!t.ok()) return t.status();
  return ChatTemplate(*std::move(t), std::move(bos_token), std::move(eos_token));
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  boost::system::error_code ec;
  boost::json::value config = boost::json::parse(ss.str(), ec);
  if (ec || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  const boost::json::object& o = config.get_object();
  auto token = [&](std::string_view key) -> std::string {
    const boost::json::value* v = o.if_contains(key);
    if (v && v->is_string()) return std::string(v->get_string());
    if (v && v->is_object()) {
      const boost::json::value* c = v->get_object().if_contains("content");
      if (c && c->is_string()) return std::string(c->get_string());
    }
    return "";
  };
  const boost::json::value* tmpl = o.if_contains("chat_template");
  std::string source;
  if (tmpl && tmpl->is_string()) {
    source = std::string(tmpl->get_string());
  } else if (tmpl && tmpl->is_array()) {  // [{"name": "default", "template": ...}, ...]
    for (const auto& entry : tmpl->get_array()) {
      const boost::json::object* e = entry.if_object();
      const boost::json::value* name = e ? e->if_contains("name") : nullptr;
      const boost::json::value* text = e ? e->if_contains("template") : nullptr;
      if (name && name->is_string() && name->get_string() == "default" && text &&
          text->is_string()) {
        source = std::string(text->get_string());
      }
    }
  }
  if (source.empty()) return absl::NotFoundError(absl::StrCat(path, ": no chat_template"));
  absl::StatusOr<ChatTemplate> t = Create(source, token("bos_token"), token("eos_token"));
  if (!t.ok())
    return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Apply(const boost::json::array& messages,
                                                bool add_generation_prompt) const {
  return Apply(messages, add_generation_prompt, {});
}

absl::StatusOr<std::string> ChatTemplate::Apply(const boost::json::array& messages,
                                                bool add_generation_prompt,
                                                const boost::json::object& extra_context) const {
  // As transformers' apply_chat_template: keys whose value is null are dropped from each
  // message, and reasoning under its older names is also offered as reasoning_content.
  boost::json::array cleaned;
  for (const boost::json::value& m : messages) {
    if (!m.is_object()) return absl::InvalidArgumentError("chat messages must be objects");
    boost::json::object o;
    for (const auto& [k, v] : m.get_object()) {
      if (!v.is_null()) o[k] = v;
    }
    for (std::string_view key : {"reasoning_content", "thinking", "reasoning"}) {
      if (const boost::json::value* r = o.if_contains(key)) {
        boost::json::value reasoning = *r;
        boost::json::object aliased;
        aliased["thinking"] = reasoning;
        for (const auto& [k, v] : o) aliased[k] = v;
        aliased["reasoning_content"] = reasoning;
        o = std::move(aliased);
        break;
      }
    }
    cleaned.push_back(std::move(o));
  }
  boost::json::object context;
  context["bos_token"] = bos_token_;
  context["eos_token"] = eos_token_;
  context["tools"] = nullptr;
  context["documents"] = nullptr;
  for (const auto& [k, v] : extra_context) context[k] = v;
  context["messages"] = std::move(cleaned);
  context["add_generation_prompt"] = add_generation_prompt;
  return jinja::Render(*template_, context);
}

}  // namespace expertmesh
