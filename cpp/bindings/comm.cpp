// pyswitch._core bindings: communicators, the collectives and the in-process LocalGroup.
#include "common.hpp"
#include "pyswitch/moe/ep_exchange.hpp"

namespace pyswitch::bindings {

void bind_comm(py::module_& m) {
  // ---- collectives ---------------------------------------------------------------------------
  py::class_<comm::Communicator>(m, "Communicator")
      .def_property_readonly("rank", &comm::Communicator::rank)
      .def_property_readonly("size", &comm::Communicator::size)
      .def_property_readonly("timeout", &comm::Communicator::timeout)
      .def("poison", &comm::Communicator::poison, py::arg("reason"))
      .def("set_next_call_check", &comm::Communicator::set_next_call_check, py::arg("value"))
      .def("all_to_all",
           [](comm::Communicator& c, py::array send, py::array recv, int64_t count) {
             const auto dt = buffer_dtype_of("all_to_all", "x", send);
             require_buffer("all_to_all", "x", send, dt, count * c.size(), false);
             require_buffer("all_to_all", "out", recv, dt, count * c.size(), true);
             py::gil_scoped_release release;
             c.all_to_all(send.data(), recv.mutable_data(), count, dt);
           })
      .def("all_to_all_v",
           [](comm::Communicator& c, py::array send, std::vector<int64_t> send_counts,
              std::vector<int64_t> send_displs, py::array recv, std::vector<int64_t> recv_counts,
              std::vector<int64_t> recv_displs) {
             const auto dt = buffer_dtype_of("all_to_all_v", "x", send);
             const size_t W = static_cast<size_t>(c.size());
             if (send_counts.size() != W || send_displs.size() != W || recv_counts.size() != W ||
                 recv_displs.size() != W) {
               throw InvalidArgument(detail::concat(
                   "all_to_all_v: counts and displacements must have ", W, " entries"));
             }
             require_buffer("all_to_all_v", "x", send, dt, 0, false);
             require_buffer("all_to_all_v", "out", recv, dt, 0, true);
             // Every block must lie inside its array (checked without overflow).
             auto check_blocks = [&](const char* name, const std::vector<int64_t>& counts,
                                     const std::vector<int64_t>& displs, int64_t size) {
               for (size_t q = 0; q < W; ++q) {
                 if (counts[q] < 0 || displs[q] < 0 || displs[q] > size ||
                     counts[q] > size - displs[q]) {
                   throw InvalidArgument(detail::concat(
                       "all_to_all_v: block ", q, " of ", name, " (count ", counts[q],
                       ", displacement ", displs[q], ") does not fit its ", size, " elements"));
                 }
               }
             };
             check_blocks("x", send_counts, send_displs, send.size());
             check_blocks("out", recv_counts, recv_displs, recv.size());
             py::gil_scoped_release release;
             c.all_to_all_v(send.data(), send_counts.data(), send_displs.data(),
                            recv.mutable_data(), recv_counts.data(), recv_displs.data(), dt);
           })
      .def(
          "all_to_all_v_rows",
          // The whole row exchange of pyswitch.comm.Communicator.all_to_all_v in one call (the
          // Python wrapper validates x and the counts): the row counts travel first, carrying
          // `check` (dtype and trailing shape), then the output is allocated and the rows move.
          [](comm::Communicator& c, py::array x, py::array_t<int64_t, py::array::c_style> rows,
             int64_t per_row, int64_t check, py::object out_obj) {
            const auto dt = buffer_dtype_of("all_to_all_v", "x", x);
            const int W = c.size();
            if (rows.ndim() != 1 || rows.shape(0) != W) {
              throw InvalidArgument(detail::concat("all_to_all_v: send_counts must have size=", W,
                                                   " entries, got ",
                                                   rows.ndim() == 1 ? rows.shape(0) : rows.size()));
            }
            // After a failed call MPI may still write into its buffers (see comm/mpi.hpp):
            // buffers of a failed exchange are left allocated on purpose.
            auto send_rows_owner =
                std::make_unique<std::vector<int64_t>>(rows.data(), rows.data() + W);
            auto recv_rows_owner = std::make_unique<std::vector<int64_t>>(W);
            std::vector<int64_t>& recv_rows = *recv_rows_owner;
            std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
            std::optional<py::array> out;
            // Runs between the counts and the rows, with the GIL: the output's size is known
            // only then.
            auto allocate = [&](int64_t received, int64_t sent) -> void* {
              py::gil_scoped_acquire acquire;
              PYSWITCH_CHECK_ARG(sent <= x.size(), "all_to_all_v: send_counts add up to ", sent,
                                 " elements but x holds ", x.size());
              shape[0] = received;
              // A caller's buffer is used when it fits (checked by the Python wrapper: dtype,
              // trailing shape, contiguity); it cannot be refused collectively here, so a buffer
              // that is too small just means a new array.
              if (!out_obj.is_none()) {
                py::array given = py::reinterpret_borrow<py::array>(out_obj);
                if (given.ndim() >= 1 && given.shape(0) >= received) {
                  py::slice first_rows(0, static_cast<py::ssize_t>(received), 1);
                  out = py::reinterpret_borrow<py::array>(
                      given[py::make_tuple(first_rows, py::ellipsis())]);
                }
              }
              if (!out) out = py::array(x.dtype(), shape);
              return out->mutable_data();
            };
            try {
              py::gil_scoped_release release;
              c.set_next_call_check(check);
              moe::all_to_all_v_rows(c, x.data(), send_rows_owner->data(), per_row, dt,
                                     recv_rows.data(), allocate);
            } catch (const CommError&) {
              send_rows_owner.release();
              recv_rows_owner.release();
              if (out) {
                out->inc_ref();  // the output and the input stay allocated (see above)
                x.inc_ref();
              }
              throw;
            }
            py::array_t<int64_t> recv_rows_array(W);
            std::copy(recv_rows.begin(), recv_rows.end(), recv_rows_array.mutable_data());
            return py::make_tuple(*out, recv_rows_array);
          },
          py::arg("x"), py::arg("send_rows"), py::arg("per_row"), py::arg("check"),
          py::arg("out") = py::none())
      .def("all_reduce",
           [](comm::Communicator& c, py::array send, py::array recv, int64_t count,
              const std::string& op) {
             const auto dt = buffer_dtype_of("all_reduce", "x", send);
             const auto rop = parse_reduce_op("all_reduce", op);
             require_buffer("all_reduce", "x", send, dt, count, false);
             require_buffer("all_reduce", "out", recv, dt, count, true);
             py::gil_scoped_release release;
             c.all_reduce(send.data(), recv.mutable_data(), count, dt, rop);
           })
      .def("all_gather",
           [](comm::Communicator& c, py::array send, py::array recv, int64_t count) {
             const auto dt = buffer_dtype_of("all_gather", "x", send);
             require_buffer("all_gather", "x", send, dt, count, false);
             require_buffer("all_gather", "out", recv, dt, count * c.size(), true);
             py::gil_scoped_release release;
             c.all_gather(send.data(), recv.mutable_data(), count, dt);
           })
      .def("reduce_scatter",
           [](comm::Communicator& c, py::array send, py::array recv, int64_t count,
              const std::string& op) {
             const auto dt = buffer_dtype_of("reduce_scatter", "x", send);
             const auto rop = parse_reduce_op("reduce_scatter", op);
             require_buffer("reduce_scatter", "x", send, dt, count * c.size(), false);
             require_buffer("reduce_scatter", "out", recv, dt, count, true);
             py::gil_scoped_release release;
             c.reduce_scatter(send.data(), recv.mutable_data(), count, dt, rop);
           })
      .def("broadcast",
           [](comm::Communicator& c, py::array buffer, int64_t count, int root) {
             const auto dt = buffer_dtype_of("broadcast", "x", buffer);
             require_buffer("broadcast", "x", buffer, dt, count, true);
             py::gil_scoped_release release;
             c.broadcast(buffer.mutable_data(), count, dt, root);
           })
      .def("barrier", [](comm::Communicator& c) {
        py::gil_scoped_release release;
        c.barrier();
      });

  py::class_<comm::LocalGroup>(m, "LocalGroup")
      .def(py::init<int, double>(), py::arg("world_size"), py::arg("timeout"))
      .def_property_readonly("size", &comm::LocalGroup::size)
      .def("comm", &comm::LocalGroup::comm, py::return_value_policy::reference_internal)
      .def("poison", &comm::LocalGroup::poison)
      .def_property_readonly("poisoned", &comm::LocalGroup::poisoned);
}

}  // namespace pyswitch::bindings
