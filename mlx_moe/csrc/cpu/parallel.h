// A small persistent thread pool for the CPU kernels: parallel_for over independent tasks,
// the calling thread taking part. Tasks are claimed from an atomic counter, so the split
// is dynamic (experts have uneven token counts), while every task writes its own outputs:
// results never depend on which thread ran what.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_moe::cpu {

class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool pool;
    return pool;
  }

  int num_threads() const { return int(workers_.size()) + 1; }

  // Runs fn(task, thread) for task in [0, n); thread is in [0, num_threads()).
  void parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn) {
    if (n <= 0) return;
    if (n == 1 || workers_.empty()) {
      for (int64_t i = 0; i < n; ++i) fn(i, 0);
      return;
    }
    std::unique_lock<std::mutex> call_lock(call_mutex_);  // one parallel region at a time
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      error_ = nullptr;
      active_ = int(workers_.size());
      ++generation_;
    }
    cv_.notify_all();
    run_tasks(0);
    {
      std::unique_lock<std::mutex> lk(m_);
      done_cv_.wait(lk, [&] { return active_ == 0; });
      fn_ = nullptr;
    }
    if (error_) std::rethrow_exception(error_);
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

 private:
  ThreadPool() {
    int n = int(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("MLX_MOE_NUM_THREADS")) n = std::atoi(env);
    n = std::max(1, std::min(n, 256));
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { worker(i); });
  }

  void run_tasks(int thread) {
    for (;;) {
      int64_t i = next_.fetch_add(1);
      if (i >= n_) break;
      try {
        (*fn_)(i, thread);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_m_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_);  // stop handing out work
      }
    }
  }

  void worker(int thread) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      run_tasks(thread);
      {
        std::lock_guard<std::mutex> lk(m_);
        --active_;
      }
      done_cv_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_, call_mutex_, err_m_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

inline void parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn) {
  ThreadPool::instance().parallel_for(n, fn);
}

inline int num_threads() {
  return ThreadPool::instance().num_threads();
}

}  // namespace mlx_moe::cpu
