// Helpers for the Redis tests: where the ctest fixture's servers are (KVC_REDIS_FIXTURE, written by
// scripts/redis.sh start both DIR), and private servers started/stopped by a test.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace kvc::store::testing {

inline std::string ReadFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

inline std::string FixtureDir() {
  const char* d = std::getenv("KVC_REDIS_FIXTURE");
  return d ? d : "";
}

// "redis://127.0.0.1:PORT" of the fixture's standalone server, "" if none.
inline std::string StandaloneUrl() {
  const std::string dir = FixtureDir();
  if (dir.empty()) return "";
  const std::string port = ReadFile(dir + "/standalone/port");
  return port.empty() ? "" : "redis://127.0.0.1:" + port;
}

inline std::vector<int> ClusterPorts() {
  std::vector<int> ports;
  const std::string dir = FixtureDir();
  if (dir.empty()) return ports;
  std::istringstream in(ReadFile(dir + "/cluster/ports"));
  int p;
  while (in >> p) ports.push_back(p);
  return ports;
}

inline int Sh(const std::string& cmd) {
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

inline std::string ShOut(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

inline std::string RedisScript() { return std::string(KVC_SOURCE_DIR) + "/scripts/redis.sh"; }

// A standalone Redis owned by one test (it may kill/restart it); stopped in the destructor.
class PrivateRedis {
 public:
  explicit PrivateRedis(const std::string& maxmemory = "256mb") {
    char tmpl[] = "/tmp/kvc-redis-XXXXXX";
    dir_ = mkdtemp(tmpl) ? tmpl : "";
    ok_ = !dir_.empty() &&
          Sh("bash " + RedisScript() + " start standalone " + dir_ + " " + maxmemory + " >/dev/null") == 0;
    if (ok_) port_ = ReadFile(dir_ + "/port");
  }
  ~PrivateRedis() {
    if (!dir_.empty()) Sh("bash " + RedisScript() + " stop " + dir_);
  }
  bool ok() const { return ok_; }
  std::string url() const { return "redis://127.0.0.1:" + port_; }
  const std::string& port() const { return port_; }
  bool Kill() { return Sh("bash " + RedisScript() + " kill " + dir_) == 0; }
  bool Resume() { return Sh("bash " + RedisScript() + " resume " + dir_ + " >/dev/null") == 0; }
  std::string Cli(const std::string& args) const {
    return ShOut("redis-cli -h 127.0.0.1 -p " + port_ + " " + args + " 2>&1");
  }

 private:
  std::string dir_, port_;
  bool ok_ = false;
};

}  // namespace kvc::store::testing
