//! `other-world`: a valid component of a world that is not `stepwise:plugin/check`; the
//! registry must reject it on upload.

wit_bindgen::generate!({
    inline: r#"
        package test:other;
        world greeter {
            export greet: func(name: string) -> string;
        }
    "#,
});

struct Greeter;

impl Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Greeter);
