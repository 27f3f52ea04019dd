// The tree-walking renderer of the chat-template interpreter; see core/text/jinja.h.
//
// NOTES: for-loops open a scope (a "set" inside a loop does not leak out, hence namespace());
// "if" does not. Undefined prints as "", is falsy and iterates as empty, but fails in
// arithmetic, attribute access and "+" with a clear message, as Jinja's default Undefined.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <optional>
#include <sstream>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "core/text/jinja.h"

namespace expertmesh::jinja {
namespace {

class Renderer {
 public:
  explicit Renderer(std::unordered_map<std::string, Value> globals) {
    scopes_.push_back(std::move(globals));
  }

  absl::Status Render(const Body& body, std::string* out) {
    for (const auto& node : body) {
      if (loop_control_ != LoopControl::kNone) return absl::OkStatus();
      EM_RETURN_IF_ERROR(Step());
      switch (node->kind) {
        case Node::Kind::kText:
          *out += node->text;
          break;
        case Node::Kind::kOutput: {
          EM_ASSIGN_OR_RETURN(auto v, Eval(*node->expr));
          *out += PyStr(v);
          break;
        }
        case Node::Kind::kIf: {
          bool done = false;
          for (const auto& [cond, branch] : node->branches) {
            EM_ASSIGN_OR_RETURN(auto c, Eval(*cond));
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
          EM_ASSIGN_OR_RETURN(auto v, Eval(*node->expr));
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
    EM_ASSIGN_OR_RETURN(auto iterable, Eval(*node.expr));
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
      if (++iterations_ > kMaxLoopIterations) return Error("too many loop iterations");
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
    EM_RETURN_IF_ERROR(Step());
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return e.literal;
      case Expr::Kind::kName:
        return Lookup(e.name);
      case Expr::Kind::kList: {
        List l;
        for (const auto& a : e.args) {
          EM_ASSIGN_OR_RETURN(auto v, Eval(*a));
          l.push_back(std::move(v));
        }
        return Value::MakeList(std::move(l));
      }
      case Expr::Kind::kDict: {
        Dict d;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          EM_ASSIGN_OR_RETURN(auto key, Eval(*e.args[k]));
          EM_ASSIGN_OR_RETURN(auto v, Eval(*e.args[k + 1]));
          if (!key.is(Value::Kind::kString)) return Error("dict keys must be strings");
          SetKey(&d, key.s, std::move(v));
        }
        return Value::MakeDict(std::move(d));
      }
      case Expr::Kind::kAttr:
      case Expr::Kind::kSubscript: {
        EM_ASSIGN_OR_RETURN(auto obj, Eval(*e.args[0]));
        if (obj.is(Value::Kind::kUndefined)) return UndefinedError(obj);
        if (e.kind == Expr::Kind::kAttr) return GetItem(obj, Value::Str(e.name));
        EM_ASSIGN_OR_RETURN(auto key, Eval(*e.args[1]));
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
        EM_ASSIGN_OR_RETURN(auto v, Eval(*e.args[0]));
        return Value::Bool(!Truthy(v));
      }
      case Expr::Kind::kNeg: {
        EM_ASSIGN_OR_RETURN(auto v, Eval(*e.args[0]));
        if (v.is(Value::Kind::kFloat)) return Value::Float(-v.f);
        if (v.numeric()) {
          if (v.as_int() == INT64_MIN) return Error("integer overflow in unary -");
          return Value::Int(-v.as_int());
        }
        return Error(absl::StrCat("bad operand type for unary -: '", TypeName(v), "'"));
      }
      case Expr::Kind::kAnd: {
        EM_ASSIGN_OR_RETURN(auto a, Eval(*e.args[0]));
        if (!Truthy(a)) return a;
        return Eval(*e.args[1]);
      }
      case Expr::Kind::kOr: {
        EM_ASSIGN_OR_RETURN(auto a, Eval(*e.args[0]));
        if (Truthy(a)) return a;
        return Eval(*e.args[1]);
      }
      case Expr::Kind::kCond: {
        EM_ASSIGN_OR_RETURN(auto c, Eval(*e.args[1]));
        if (Truthy(c)) return Eval(*e.args[0]);
        if (e.args.size() > 2) return Eval(*e.args[2]);
        return Value::Undefined("conditional expression without else");
      }
      case Expr::Kind::kBinary: {
        EM_ASSIGN_OR_RETURN(auto a, Eval(*e.args[0]));
        EM_ASSIGN_OR_RETURN(auto b, Eval(*e.args[1]));
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
      if (b.as_int() > 0 && a.s.size() * static_cast<uint64_t>(b.as_int()) > kMaxStringBytes) {
        return Error("string repetition too long");
      }
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
        // Python's integers have no bound; ours are int64, and a result outside it is an error
        // (never a wrapped value).
        int64_t x = a.as_int(), y = b.as_int(), r = 0;
        if (op == "+" || op == "-" || op == "*") {
          const bool overflow = op == "+"   ? __builtin_add_overflow(x, y, &r)
                                : op == "-" ? __builtin_sub_overflow(x, y, &r)
                                            : __builtin_mul_overflow(x, y, &r);
          if (overflow) return Error(absl::StrCat("integer overflow in ", x, " ", op, " ", y));
          return Value::Int(r);
        }
        if (y == 0) return Error("division by zero");
        if (x == INT64_MIN && y == -1)
          return Error(absl::StrCat("integer overflow in ", x, " ", op, " -1"));
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
    EM_ASSIGN_OR_RETURN(auto obj, Eval(*e.args[0]));
    std::optional<int64_t> bound[3];
    for (int k = 0; k < 3; ++k) {
      if (!e.args[k + 1]) continue;
      EM_ASSIGN_OR_RETURN(auto v, Eval(*e.args[k + 1]));
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
      EM_ASSIGN_OR_RETURN(auto v, Eval(*e.args[k]));
      args.positional.push_back(std::move(v));
    }
    for (const auto& [name, x] : e.kwargs) {
      EM_ASSIGN_OR_RETURN(auto v, Eval(*x));
      args.named.emplace_back(name, std::move(v));
    }
    return args;
  }

  absl::StatusOr<Value> EvalCall(const Expr& e) {
    const Expr& callee = *e.args[0];
    EM_ASSIGN_OR_RETURN(auto args, EvalArgs(e, 1));
    if (callee.kind == Expr::Kind::kAttr) {  // method call
      EM_ASSIGN_OR_RETURN(auto obj, Eval(*callee.args[0]));
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
      // Length as Python computes it, in 128 bits (stop - start can exceed int64).
      const __int128 span = static_cast<__int128>(stop) - start;
      const __int128 length = step > 0 ? (span > 0 ? (span + step - 1) / step : 0)
                                       : (span < 0 ? (span + step + 1) / step : 0);
      if (length > kMaxRangeLength) return Error("range() too long");
      List l;
      for (__int128 k = 0; k < length; ++k)
        l.push_back(Value::Int(static_cast<int64_t>(start + k * step)));
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
    EM_ASSIGN_OR_RETURN(auto v, Eval(*e.args[0]));
    EM_ASSIGN_OR_RETURN(auto args, EvalArgs(e, 1));
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
      EM_ASSIGN_OR_RETURN(auto s, ToJson(v, ind, sort_keys && Truthy(*sort_keys), 0));
      return Value::Str(s);
    }
    return absl::UnimplementedError(
        absl::StrCat("chat template: unsupported filter '", f, "' on ", TypeName(v)));
  }

  absl::StatusOr<Value> EvalTest(const Expr& e) {
    using K = Value::Kind;
    bool negated = e.name.starts_with("not ");
    std::string t = negated ? e.name.substr(4) : e.name;
    EM_ASSIGN_OR_RETURN(auto v, Eval(*e.args[0]));
    EM_ASSIGN_OR_RETURN(auto args, EvalArgs(e, 1));
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
  int64_t iterations_ = 0;
  int64_t steps_ = 0;

  absl::Status Step() {
    if (++steps_ > kMaxRenderSteps) {
      return Error(absl::StrCat("rendering needs more than ", kMaxRenderSteps, " steps"));
    }
    return absl::OkStatus();
  }
};

}  // namespace

bool IsSupportedFilter(std::string_view name) {
  static constexpr std::string_view kFilters[] = {
      "default", "d",      "trim", "upper", "lower",  "title", "capitalize",
      "replace", "string", "safe", "int",   "length", "count", "first",
      "last",    "list",   "join", "items", "tojson"};
  return std::find(std::begin(kFilters), std::end(kFilters), name) != std::end(kFilters);
}

bool IsSupportedTest(std::string_view name) {
  static constexpr std::string_view kTests[] = {
      "defined",  "undefined", "none", "string", "number",  "integer",
      "float",    "boolean",   "true", "false",  "mapping", "sequence",
      "iterable", "even",      "odd",  "eq",     "equalto", "=="};
  return std::find(std::begin(kTests), std::end(kTests), name) != std::end(kTests);
}

absl::StatusOr<std::string> Render(const Template& t, const boost::json::object& context) {
  std::unordered_map<std::string, Value> globals;
  for (const auto& [k, v] : context) globals[std::string(k)] = FromJson(v);
  Renderer r(std::move(globals));
  std::string out;
  EM_RETURN_IF_ERROR(r.Render(t.body, &out));
  return out;
}

}  // namespace expertmesh::jinja
