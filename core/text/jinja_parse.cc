// Lexers and parsers of the chat-template interpreter; see core/text/jinja.h.
//
// Template lexing applies Jinja's whitespace rules ("-" control, trim_blocks, lstrip_blocks);
// expressions are parsed by recursive descent in Jinja's precedence order.
#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/text/jinja.h"

namespace expertmesh::jinja {
namespace {

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
  if (out.size() > kMaxExpressionTokens) {
    return Error(absl::StrCat("expression of ", out.size(), " tokens is too long"));
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
    EM_ASSIGN_OR_RETURN(auto e, ParseExpression());
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
  // Nesting of sub-expressions ((), [], unary operators) bounds the parser's recursion
  // (found by chat_template_fuzz: a thousand '[' overflowed the stack).
  static constexpr int kMaxExpressionDepth = 200;
  struct DepthGuard {
    explicit DepthGuard(int& depth) : depth(depth) { ++depth; }
    ~DepthGuard() { --depth; }
    int& depth;
  };
  int depth_ = 0;

  absl::StatusOr<ExprPtr> ParseConditional() {
    const DepthGuard guard(depth_);
    if (depth_ > kMaxExpressionDepth) return Error("expression nested too deeply");
    EM_ASSIGN_OR_RETURN(auto value, ParseOr());
    if (!AcceptName("if")) return value;
    EM_ASSIGN_OR_RETURN(auto cond, ParseOr());
    ExprPtr e = MakeExpr(Expr::Kind::kCond);
    e->args.push_back(std::move(value));
    e->args.push_back(std::move(cond));
    if (AcceptName("else")) {
      EM_ASSIGN_OR_RETURN(auto other, ParseConditional());
      e->args.push_back(std::move(other));
    }
    return e;
  }
  absl::StatusOr<ExprPtr> ParseOr() {
    EM_ASSIGN_OR_RETURN(auto left, ParseAnd());
    while (AcceptName("or")) {
      EM_ASSIGN_OR_RETURN(auto right, ParseAnd());
      left = Binary(Expr::Kind::kOr, "or", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseAnd() {
    EM_ASSIGN_OR_RETURN(auto left, ParseNot());
    while (AcceptName("and")) {
      EM_ASSIGN_OR_RETURN(auto right, ParseNot());
      left = Binary(Expr::Kind::kAnd, "and", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseNot() {
    const DepthGuard guard(depth_);
    if (depth_ > kMaxExpressionDepth) return Error("expression nested too deeply");
    if (AcceptName("not")) {
      EM_ASSIGN_OR_RETURN(auto operand, ParseNot());
      ExprPtr e = MakeExpr(Expr::Kind::kNot);
      e->args.push_back(std::move(operand));
      return e;
    }
    return ParseCompare();
  }
  absl::StatusOr<ExprPtr> ParseCompare() {
    EM_ASSIGN_OR_RETURN(auto left, ParseMath1());
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
      EM_ASSIGN_OR_RETURN(auto right, ParseMath1());
      left = Binary(Expr::Kind::kBinary, op, std::move(left), std::move(right));
    }
  }
  absl::StatusOr<ExprPtr> ParseMath1() {
    EM_ASSIGN_OR_RETURN(auto left, ParseConcat());
    while (IsOp("+") || IsOp("-")) {
      std::string op = toks_[pos_++].text;
      EM_ASSIGN_OR_RETURN(auto right, ParseConcat());
      left = Binary(Expr::Kind::kBinary, op, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseConcat() {
    EM_ASSIGN_OR_RETURN(auto left, ParseMath2());
    while (Accept("~")) {
      EM_ASSIGN_OR_RETURN(auto right, ParseMath2());
      left = Binary(Expr::Kind::kBinary, "~", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseMath2() {
    EM_ASSIGN_OR_RETURN(auto left, ParseUnary());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      std::string op = toks_[pos_++].text;
      EM_ASSIGN_OR_RETURN(auto right, ParseUnary());
      left = Binary(Expr::Kind::kBinary, op, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseUnary() {
    const DepthGuard guard(depth_);
    if (depth_ > kMaxExpressionDepth) return Error("expression nested too deeply");
    if (Accept("-")) {
      EM_ASSIGN_OR_RETURN(auto operand, ParseUnary());
      ExprPtr e = MakeExpr(Expr::Kind::kNeg);
      e->args.push_back(std::move(operand));
      return e;
    }
    Accept("+");
    EM_ASSIGN_OR_RETURN(auto primary, ParsePrimary());
    EM_ASSIGN_OR_RETURN(auto postfix, ParsePostfix(std::move(primary)));
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
        const auto [end, ec] = std::from_chars(t.text.data(), t.text.data() + t.text.size(), x);
        if (ec != std::errc() || end != t.text.data() + t.text.size()) {
          return Error(absl::StrCat("integer literal ", t.text, " is out of range"));
        }
        return Literal(Value::Int(x));
      }
      case Tok::Kind::kFloat:
        ++pos_;
        // strtod, not stod: a literal beyond double's range is inf (as in Python), not an
        // exception (found by chat_template_fuzz).
        return Literal(Value::Float(std::strtod(t.text.c_str(), nullptr)));
      case Tok::Kind::kName: {
        ++pos_;
        if (t.text == "true" || t.text == "True") return Literal(Value::Bool(true));
        if (t.text == "false" || t.text == "False") return Literal(Value::Bool(false));
        if (t.text == "none" || t.text == "None") return Literal(Value::None());
        return MakeExpr(Expr::Kind::kName, t.text);
      }
      case Tok::Kind::kOp:
        if (Accept("(")) {
          EM_ASSIGN_OR_RETURN(auto first, ParseExpression());
          if (!IsOp(",")) {
            EM_RETURN_IF_ERROR(Expect(")"));
            return first;
          }
          ExprPtr tuple = MakeExpr(Expr::Kind::kList);  // tuples behave as lists here
          tuple->args.push_back(std::move(first));
          while (Accept(",") && !IsOp(")")) {
            EM_ASSIGN_OR_RETURN(auto item, ParseExpression());
            tuple->args.push_back(std::move(item));
          }
          EM_RETURN_IF_ERROR(Expect(")"));
          return tuple;
        }
        if (Accept("[")) {
          ExprPtr list = MakeExpr(Expr::Kind::kList);
          while (!IsOp("]")) {
            EM_ASSIGN_OR_RETURN(auto item, ParseExpression());
            list->args.push_back(std::move(item));
            if (!Accept(",")) break;
          }
          EM_RETURN_IF_ERROR(Expect("]"));
          return list;
        }
        if (Accept("{")) {
          ExprPtr dict = MakeExpr(Expr::Kind::kDict);
          while (!IsOp("}")) {
            EM_ASSIGN_OR_RETURN(auto key, ParseExpression());
            EM_RETURN_IF_ERROR(Expect(":"));
            EM_ASSIGN_OR_RETURN(auto value, ParseExpression());
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
        EM_ASSIGN_OR_RETURN(auto name, ExpectName());
        ExprPtr attr = MakeExpr(Expr::Kind::kAttr, name);
        attr->args.push_back(std::move(e));
        e = std::move(attr);
      } else if (Accept("[")) {
        std::array<ExprPtr, 3> parts;  // start, stop, step
        bool is_slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!IsOp(":") && !IsOp("]")) {
            EM_ASSIGN_OR_RETURN(auto part, ParseExpression());
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
        EM_ASSIGN_OR_RETURN(auto value, ParseExpression());
        call->kwargs.emplace_back(key, std::move(value));
      } else {
        EM_ASSIGN_OR_RETURN(auto value, ParseExpression());
        call->args.push_back(std::move(value));
      }
      if (!Accept(",")) break;
    }
    return Expect(")");
  }
  absl::StatusOr<ExprPtr> ParseFiltersAndTests(ExprPtr e) {
    while (true) {
      if (Accept("|")) {
        EM_ASSIGN_OR_RETURN(auto name, ExpectName());
        if (!IsSupportedFilter(name)) {
          return absl::UnimplementedError(
              absl::StrCat("chat template: unsupported filter '", name, "'"));
        }
        ExprPtr filter = MakeExpr(Expr::Kind::kFilter, name);
        filter->args.push_back(std::move(e));
        if (IsOp("(")) EM_RETURN_IF_ERROR(ParseCallArgs(filter.get()));
        e = std::move(filter);
      } else if (AcceptName("is")) {
        bool negated = AcceptName("not");
        EM_ASSIGN_OR_RETURN(auto name, ExpectName());
        if (!IsSupportedTest(name)) {
          return absl::UnimplementedError(
              absl::StrCat("chat template: unsupported test '", name, "'"));
        }
        ExprPtr test = MakeExpr(Expr::Kind::kTest, negated ? "not " + name : name);
        test->args.push_back(std::move(e));
        if (IsOp("(")) {
          EM_RETURN_IF_ERROR(ParseCallArgs(test.get()));
        } else if (Peek().kind == Tok::Kind::kString || Peek().kind == Tok::Kind::kInt ||
                   (Peek().kind == Tok::Kind::kName && !IsName("and") && !IsName("or") &&
                    !IsName("else") && !IsName("if") && !IsName("in") && !IsName("not"))) {
          EM_ASSIGN_OR_RETURN(auto arg, ParsePrimary());  // e.g. `x is divisibleby 3`
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
    if (++nesting_ > kMaxStatementNesting) return Error("statements nested too deeply");
    absl::Status s = ParseBodyNested(body, stops, stop);
    --nesting_;
    return s;
  }
  absl::Status ParseBodyNested(Body* body, const std::vector<std::string>& stops,
                               std::string* stop) {
    while (pos_ < pieces_.size()) {
      const Piece& p = pieces_[pos_++];
      if (p.kind == Piece::Kind::kText) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::kText;
        n->text = p.content;
        body->push_back(std::move(n));
        continue;
      }
      EM_ASSIGN_OR_RETURN(auto toks, LexExpr(p.content));
      auto parser = std::make_unique<ExprParser>(std::move(toks));
      if (p.kind == Piece::Kind::kVar) {
        EM_ASSIGN_OR_RETURN(auto e, parser->ParseAll());
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::kOutput;
        n->expr = std::move(e);
        body->push_back(std::move(n));
        continue;
      }
      EM_ASSIGN_OR_RETURN(auto keyword, parser->ExpectName());
      if (std::find(stops.begin(), stops.end(), keyword) != stops.end()) {
        *stop = keyword;
        stop_parser_ = std::move(parser);
        return absl::OkStatus();
      }
      auto n = std::make_unique<Node>();
      if (keyword == "if") {
        n->kind = Node::Kind::kIf;
        EM_ASSIGN_OR_RETURN(auto cond, parser->ParseAll());
        std::string end;
        Body branch;
        EM_RETURN_IF_ERROR(ParseBody(&branch, {"elif", "else", "endif"}, &end));
        n->branches.emplace_back(std::move(cond), std::move(branch));
        while (end == "elif") {
          EM_ASSIGN_OR_RETURN(auto c, stop_parser_->ParseAll());
          Body b;
          EM_RETURN_IF_ERROR(ParseBody(&b, {"elif", "else", "endif"}, &end));
          n->branches.emplace_back(std::move(c), std::move(b));
        }
        if (end == "else") EM_RETURN_IF_ERROR(ParseBody(&n->else_body, {"endif"}, &end));
        if (end != "endif") return Error("missing {% endif %}");
      } else if (keyword == "for") {
        n->kind = Node::Kind::kFor;
        do {
          EM_ASSIGN_OR_RETURN(auto var, parser->ExpectName());
          n->loop_vars.push_back(var);
        } while (parser->Accept(","));
        if (!parser->AcceptName("in")) return Error("expected 'in' in for");
        // The iterable is parsed without the conditional so that `if` starts a loop filter.
        EM_ASSIGN_OR_RETURN(auto iter, ParseLoopIterable(parser.get()));
        n->expr = std::move(iter);
        if (parser->AcceptName("if")) {
          EM_ASSIGN_OR_RETURN(auto filter, parser->ParseExpression());
          n->loop_filter = std::move(filter);
        }
        if (!parser->AtEnd()) return Error("unexpected tokens after for");
        std::string end;
        EM_RETURN_IF_ERROR(ParseBody(&n->body, {"else", "endfor"}, &end));
        if (end == "else") EM_RETURN_IF_ERROR(ParseBody(&n->else_body, {"endfor"}, &end));
        if (end != "endfor") return Error("missing {% endfor %}");
      } else if (keyword == "set") {
        n->kind = Node::Kind::kSet;
        EM_ASSIGN_OR_RETURN(auto target, parser->ExpectName());
        n->target = target;
        if (parser->Accept(".")) {
          EM_ASSIGN_OR_RETURN(auto attr, parser->ExpectName());
          n->target_attr = attr;
        }
        if (!parser->Accept("=")) return Error("block {% set %} is not supported");
        EM_ASSIGN_OR_RETURN(auto value, parser->ParseAll());
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
  int nesting_ = 0;
  std::unique_ptr<ExprParser> stop_parser_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<const Template>> Parse(std::string_view source) {
  EM_ASSIGN_OR_RETURN(auto pieces, LexTemplate(source));
  TemplateParser parser(std::move(pieces));
  EM_ASSIGN_OR_RETURN(auto body, parser.ParseAll());
  auto t = std::make_shared<Template>();
  t->body = std::move(body);
  return std::shared_ptr<const Template>(std::move(t));
}

}  // namespace expertmesh::jinja
